"""Keep notebooks in git readable: no outputs, no execution counts, stable metadata."""

from pathlib import Path

import nbformat

# The only notebook-level metadata kept: which kernel runs it. Everything else
# (widget state, language_info details, timings) changes on every run.
# The kernel `make setup` installs, running the course's own environment.
KERNELSPEC = {"display_name": "LLM course", "language": "python", "name": "llm-course"}
# nbgrader marks locked cells not deletable or editable in the released notebooks.
CELL_METADATA_KEPT = ("nbgrader", "tags", "deletable", "editable")


def clean(nb) -> None:
    """Strip outputs, execution counts and volatile metadata from ``nb`` in place."""
    nb.metadata = nbformat.NotebookNode(kernelspec=KERNELSPEC, language_info={"name": "python"})
    for cell in nb.cells:
        cell.metadata = nbformat.NotebookNode(
            {k: v for k, v in cell.metadata.items() if k in CELL_METADATA_KEPT})
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None


def problems(path: Path) -> list[str]:
    """What would make this notebook's diff noisy: outputs, execution counts, volatile metadata."""
    nb = nbformat.read(path, as_version=4)
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            found.append(f"cell {i} has outputs or an execution count")
        extra = set(cell.metadata) - set(CELL_METADATA_KEPT)
        if extra:
            found.append(f"cell {i} has volatile metadata {sorted(extra)}")
    if set(nb.metadata) - {"kernelspec", "language_info"}:
        found.append(f"notebook metadata has {sorted(set(nb.metadata) - {'kernelspec', 'language_info'})}")
    return found


def clean_file(path: Path) -> bool:
    """Clean the notebook at ``path``; return whether the file changed."""
    before = path.read_text()
    nb = nbformat.read(path, as_version=4)
    clean(nb)
    after = nbformat.writes(nb) + "\n"
    if after != before:
        path.write_text(after)
    return after != before
