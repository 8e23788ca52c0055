"""Make submissions gradable before nbgrader sees them: report invalid files, restore stripped metadata.

A notebook whose nbgrader cell metadata was stripped (copied into a new notebook, saved by
another editor) yields no grades. Its cells are matched against the released notebook:
cell id first, then identical source for locked cells, then order and type for the
solution cells between two matched cells.
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
    cells, in place. Returns what was repaired (empty when nothing was missing)."""
    nb = nbformat.read(path, as_version=4)
    released = nbformat.read(release, as_version=4)
    wanted = [c for c in released.cells if _meta(c)]
    have = {_meta(c).get("grade_id") for c in nb.cells if _meta(c)}
    if all(_meta(c)["grade_id"] in have for c in wanted if _meta(c).get("solution")):
        return []
    by_id = {c.get("id"): c for c in nb.cells if not _meta(c)}
    taken: dict[int, object] = {}  # submission cell index -> released cell
    repaired = []
    for ref in wanted:
        match = by_id.get(ref.get("id"))
        if match is None and _meta(ref).get("locked"):
            match = next((c for c in nb.cells if not _meta(c) and id(c) not in map(id, taken.values())
                          and c.source == ref.source), None)
        if match is not None and match.cell_type == ref.cell_type:
            taken[nb.cells.index(match)] = ref
    # Solution cells not matched yet: the first unmatched code cell after the previous match.
    position = -1
    for ref in wanted:
        done = [i for i, r in taken.items() if r is ref]
        if done:
            position = done[0]
            continue
        if not _meta(ref).get("solution"):
            continue  # a missing locked cell: nbgrader restores it (add_missing_cells)
        for i in range(position + 1, len(nb.cells)):
            cell = nb.cells[i]
            if i not in taken and not _meta(cell) and cell.cell_type == ref.cell_type:
                taken[i] = ref
                position = i
                break
    for i, ref in sorted(taken.items()):
        nb.cells[i].metadata["nbgrader"] = dict(_meta(ref))
        for key in ("deletable", "editable"):
            if key in ref.metadata:
                nb.cells[i].metadata[key] = ref.metadata[key]
        repaired.append(_meta(ref)["grade_id"])
    if repaired:
        nbformat.write(nb, path)
    return [f"restored nbgrader metadata of {len(repaired)} cell(s)"] if repaired else []
