"""Where things are: the phases, the course folders, the instructor state."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "solutions"
RELEASE = ROOT / "course"
STATE = ROOT / "autograde"
SUBMITTED = STATE / "submitted"
AUTOGRADED = STATE / "autograded"
FEEDBACK = STATE / "feedback"
DOWNLOADED = STATE / "downloaded"
GRADEBOOK = STATE / "gradebook.db"

# One nbgrader assignment per phase, in teaching order.
PHASES = (
    "01_attention",
    "02_transformer",
    "03_pretraining",
    "04_scaling_laws",
    "05_sft",
    "06_rlhf",
    "07_parallelism",
    "08_quantization",
)

# How an LMS (Canvas, for one) names files in a bulk download: "<student>_[late_][<ids>_]<notebook>.ipynb".
# nbgrader matches it against the whole path of each extracted file.
LMS_FILENAME_REGEX = r".*/(?P<student_id>[A-Za-z0-9.\-]+)_(?:late_)?(?:\d+_)*(?P<file_id>[^/_][^/]*\.ipynb)$"


def available_phases() -> list[str]:
    """The phases that have a source folder in solutions/, in teaching order."""
    return [p for p in PHASES if (SOURCE / p).is_dir()]
