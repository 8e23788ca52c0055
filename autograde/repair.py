"""Make submissions gradable before nbgrader sees them: report invalid files, restore stripped
metadata, put back deleted written answers.

A notebook whose nbgrader cell metadata was stripped (copied into a new notebook, saved by
another editor) yields no grades. Its cells are matched against the released notebook:
cell id first, then identical source for locked cells, then order and type for the
solution cells between two matched cells (never a cell of the release's own prose: a written
question is not its answer). A deleted written-answer cell comes back empty, after its question.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat


def _meta(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def check(path: Path) -> str | None:
    """Why the file at ``path`` is not a notebook nbgrader can grade, or None if it is."""
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except (json.JSONDecodeError, UnicodeDecodeError, nbformat.ValidationError) as error:
        return f"invalid notebook: {type(error).__name__}"
    except Exception as error:  # nbformat raises many kinds on malformed input
        return f"invalid notebook: {type(error).__name__}: {str(error)[:80]}"
    return None


def restore_metadata(path: Path, release: Path) -> list[str]:
    """Give the cells of the submission at ``path`` the nbgrader metadata of the matching released
    cells, and put back written answers the student deleted, in place. Returns what was repaired
    (empty when nothing was missing)."""
    nb = nbformat.read(path, as_version=4)
    released = nbformat.read(release, as_version=4)
    repaired = _match_stripped_cells(nb, released)
    restored = _restore_written_answers(nb, released)
    if repaired or restored:
        nbformat.write(nb, path)
    return ([f"restored nbgrader metadata of {len(repaired)} cell(s)"] if repaired else []) + [
        f"written answer {gid} was deleted: restored empty, 0 points until graded by hand" for gid in restored]


def _match_stripped_cells(nb, released) -> list[str]:
    """Stamp released metadata on the submission's cells that lost it; the grade_ids stamped."""
    wanted = [c for c in released.cells if _meta(c)]
    by_grade_id = {_meta(c)["grade_id"]: c for c in wanted}
    # Cells that kept their metadata anchor the search for those that lost it.
    taken: dict[int, object] = {i: by_grade_id[_meta(c).get("grade_id")] for i, c in enumerate(nb.cells)
                                if _meta(c).get("grade_id") in by_grade_id}
    anchors = set(taken)
    if all(any(r is ref for r in taken.values()) for ref in wanted if _meta(ref).get("solution")):
        return []

    def free(i: int) -> bool:
        return i not in taken and not _meta(nb.cells[i])

    # Cell id first, then identical source for locked cells.
    by_id = {c.get("id"): i for i, c in enumerate(nb.cells) if free(i)}
    for ref in wanted:
        if any(r is ref for r in taken.values()):
            continue
        match = by_id.get(ref.get("id"))
        if match is None and _meta(ref).get("locked"):
            match = next((i for i, c in enumerate(nb.cells) if free(i) and c.source == ref.source), None)
        if match is not None and free(match) and nb.cells[match].cell_type == ref.cell_type:
            taken[match] = ref
    # Solution cells not matched yet: the first cell of their type between the matched cells before
    # and after them, skipping the release's own prose (a question is not its answer).
    prose = {c.source for c in released.cells if not _meta(c)}
    order = {id(ref): k for k, ref in enumerate(wanted)}
    for k, ref in enumerate(wanted):
        if any(r is ref for r in taken.values()) or not _meta(ref).get("solution"):
            continue  # a missing locked cell: nbgrader restores it (add_missing_cells)
        low = max((i for i, r in taken.items() if order[id(r)] < k), default=-1)
        high = min((i for i, r in taken.items() if order[id(r)] > k), default=len(nb.cells))
        for i in range(low + 1, high):
            cell = nb.cells[i]
            if free(i) and cell.cell_type == ref.cell_type and cell.source not in prose:
                taken[i] = ref
                break
    stamped = []
    for i, ref in sorted(taken.items()):
        if i in anchors:
            continue
        nb.cells[i].metadata["nbgrader"] = dict(_meta(ref))
        for key in ("deletable", "editable"):
            if key in ref.metadata:
                nb.cells[i].metadata[key] = ref.metadata[key]
        stamped.append(_meta(ref)["grade_id"])
    return stamped


# What a restored written answer says, to the grader in Formgrader and to the student in feedback.
DELETED_ANSWER = "*(This answer cell was deleted from the submission; the grader restored it empty.)*"


def is_written_answer(cell) -> bool:
    """A manually graded markdown answer cell (README: the written-question pattern)."""
    meta = _meta(cell)
    return cell.cell_type == "markdown" and bool(meta.get("grade")) and bool(meta.get("solution"))


def _restore_written_answers(nb, released) -> list[str]:
    """Put back, empty, each written-answer cell the submission lacks; the grade_ids restored.

    nbgrader's own ``add_missing_cells`` would re-add it with its placeholder, but it crashes when the
    cell before it in the release is gone too, and it is the grader's job to say it was deleted."""
    present = {_meta(c).get("grade_id") for c in nb.cells}
    restored = []
    for k, ref in enumerate(released.cells):
        grade_id = _meta(ref).get("grade_id")
        if not is_written_answer(ref) or grade_id in present:
            continue
        cell = nbformat.from_dict(json.loads(json.dumps(ref)))
        cell.source = DELETED_ANSWER
        if nb.nbformat_minor < 5:
            cell.pop("id", None)
        elif any(c.get("id") == cell.get("id") for c in nb.cells):
            cell["id"] = f"restored-{grade_id}"[:64]
        nb.cells.insert(_after_predecessor(nb, released, k), cell)
        restored.append(grade_id)
    return restored


def _after_predecessor(nb, released, k: int) -> int:
    """Where released cell ``k`` belongs in the submission: just after the nearest cell before it in
    the release that the submission still has (its question, or the last graded cell), else at the end."""
    for ref in reversed(released.cells[:k]):
        grade_id = _meta(ref).get("grade_id")
        for i, cell in enumerate(nb.cells):
            if (_meta(cell).get("grade_id") == grade_id) if grade_id else (
                    not _meta(cell) and cell.source == ref.source):
                return i + 1
    return len(nb.cells)
