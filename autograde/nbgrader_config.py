"""nbgrader configuration for the course.

Loaded through the stub ``nbgrader_config.py`` at the repository root, so every
nbgrader command must run from there (``python -m autograde ...`` does).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The feedback preprocessor below lives in the autograde package at the root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from autograde.feedback import FeedbackFromVerdicts  # noqa: E402
from autograde.layout import LMS_FILENAME_REGEX  # noqa: E402
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor  # noqa: E402
from nbgrader.preprocessors import GetGrades  # noqa: E402

c = get_config()  # noqa: F821 (injected by traitlets)

c.CourseDirectory.course_id = "llm-course"
c.CourseDirectory.root = str(ROOT)
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "course"
# Instructor state: git-ignored, under autograde/.
c.CourseDirectory.submitted_directory = "autograde/submitted"
c.CourseDirectory.autograded_directory = "autograde/autograded"
c.CourseDirectory.feedback_directory = "autograde/feedback"
c.ZipCollectApp.downloaded_directory = "autograde/downloaded"
c.ZipCollectApp.archive_directory = "archive"
c.ZipCollectApp.extracted_directory = "extracted"
# Submissions are graded in parallel, one nbgrader process each: SQLite waits for the lock.
c.CourseDirectory.db_url = f"sqlite:///{ROOT / 'autograde' / 'gradebook.db'}?timeout=60"

# A grade cell that writes anything to stderr scores 0, so the kernels nbgrader starts
# (autograde, validate, the Validate button) silence warnings and progress bars first.
# Set in the kernel, not in this process: the Validate button loads this file into the
# Jupyter server, whose environment every student kernel inherits.
c.Execute.extra_arguments = [
    "--IPKernelApp.exec_lines=import os, warnings; warnings.simplefilter('ignore'); "
    "os.environ['TQDM_DISABLE'] = '1'"
]

# Student code runs in a sandbox (autograde/sandbox.py): no network, no view of solutions/,
# the gradebook or other students, a private working directory, limits on memory and processes.
c.Execute.kernel_manager_class = "autograde.sandbox.SandboxedKernelManager"

# A cell that runs longer than this is interrupted and scores 0; grading goes on.
c.Execute.timeout = 120
c.Execute.interrupt_on_timeout = True
# On a busy grading machine a kernel's output can lag behind its reply by more than nbclient's 4 s
# default, which fails the whole submission ("Timeout waiting for IOPub output").
c.Execute.iopub_timeout = 60

# A graded copy keeps no widget state: the explorers' figures made 5 MB of Phase 1's copy (and of its
# feedback page), written and validated for every submission, for widgets nobody moves there.
c.Execute.store_widget_state = False

# A student who deletes a locked test cell gets it back (and is graded on it).
c.OverwriteCells.add_missing_cells = True

# Feedback is made from verdicts: pass/fail per test cell and the visible tests' messages (autograde/feedback.py).
c.GenerateFeedback.preprocessors = [GetGrades, CSSHTMLHeaderPreprocessor, FeedbackFromVerdicts]

# LMS downloads (zip_collect): "<student>_[late_][<numbers>_]<notebook>.ipynb", as Canvas names them.
c.ZipCollectApp.collector_plugin = "nbgrader.plugins.FileNameCollectorPlugin"
c.FileNameCollectorPlugin.named_regexp = LMS_FILENAME_REGEX
