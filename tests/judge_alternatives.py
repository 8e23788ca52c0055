"""The judge on correct solutions written other ways: every one must keep every point.

    .venv/bin/python tests/judge_alternatives.py [phase ...]

The phase tests (``tests/test_phaseNN_exercises.py``) hold, per exercise, correct alternatives
(``EXn_CORRECT``: name -> solution cell) that the in-process tests give full marks. Here each is
graded as autograding grades it: the verifier re-runs the notebook and the judge replays the listed
test cells (``autograde/replayable.json``). Run k puts the k-th alternative of every exercise in the
notebook at once; a test cell of a replaced exercise that the verifier or the judge fails is printed
(with why), as is one the judge leaves undecided (flagged for a person: no point lost, but noise).
Exit status 1 when an alternative lost a point. A maintainer's check (about 10 minutes for the
course), not part of ``make test``.
"""

from __future__ import annotations

import copy
import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import nbformat  # noqa: E402

from autograde import judge, verify  # noqa: E402


def alternatives(module) -> dict[str, list[tuple[str, str]]]:
    """Per exercise, the (name, source) of its correct alternatives in a phase test module."""
    found = {}
    for attribute, value in vars(module).items():
        match = re.fullmatch(r"(EX\d+)_CORRECT(_\w+)?", attribute)
        if match and isinstance(value, dict):
            found.setdefault(match.group(1).lower(), []).extend(value.items())
    return found


def main(phases: list[str]) -> int:
    lost = 0
    for test_file in sorted((ROOT / "tests").glob("test_phase*_exercises.py")):
        module = importlib.import_module(test_file.stem)
        source = getattr(module, "NB", None)
        if source is None:
            continue
        phase, notebook = source.path.parent.name, source.path.stem
        if phases and phase not in phases:
            continue
        found = alternatives(module)
        runs = max((len(v) for v in found.values()), default=0)
        print(f"{phase}/{notebook}: {sum(len(v) for v in found.values())} alternatives in {runs} runs", flush=True)
        for run in range(runs):
            nb = copy.deepcopy(source.nb)
            replaced = {}
            for cell in nb.cells:
                gid = cell.metadata.get("nbgrader", {}).get("grade_id", "")
                exercise = gid.removesuffix("_solution")
                if gid.endswith("_solution") and run < len(found.get(exercise, [])):
                    name, cell.source = found[exercise][run]
                    replaced[exercise] = name
            verdicts = verify.run(nb, source.nb, phase, 300, notebook=notebook)
            listed = set(judge.replayable(phase, notebook))
            for exercise, name in sorted(replaced.items()):
                for gid in source.tests_of(exercise):
                    if not verdicts.passed.get(gid):
                        lost += 1
                        print(f"  LOST {gid} ({name}): {verdicts.reasons.get(gid)}", flush=True)
                    elif gid in verdicts.undecided:
                        print(f"  undecided {gid} ({name}): {verdicts.undecided[gid]}", flush=True)
                    elif gid in listed and gid not in verdicts.judged:
                        lost += 1
                        print(f"  NOT JUDGED {gid} ({name})", flush=True)
            print(f"  run {run + 1}: {', '.join(f'{e}: {n}' for e, n in sorted(replaced.items()))}", flush=True)
    print("every alternative kept every point" if not lost else f"{lost} test cells lost")
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
