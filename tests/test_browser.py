"""The course as a student sees it: JupyterLab in a real (headless) browser.

Executing a notebook with nbclient proves the code runs, not that the student sees anything:
a missing lab extension leaves a plotly figure or a widget silently blank. Here JupyterLab runs
the Phase 1 notebook in Chromium, and the test looks at the page: sliders, plotly figures and
tqdm bars drawn, no error output; then nbgrader's Validate button on a released notebook.

Needs the `playwright` package (a project dependency) and a Chromium build on the machine
(`apt-get install chromium`; Playwright's own browser download needs internet). Without either,
the tests skip. Screenshots go to pytest's temporary folder and to tests/artifacts/browser/.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest

from lab_server import ROOT, running_jupyterlab

SOLUTION = ROOT / "solutions" / "01_attention" / "attention.ipynb"
RELEASED = ROOT / "course" / "01_attention" / "attention.ipynb"
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"

# Generous bounds on waits for page state (the Phase 1 notebook runs for a minute or two on a
# laptop CPU, nbgrader's validation about half a minute); a wait ends as soon as the state holds.
RUN_TIMEOUT_MS = 5 * 60_000
RENDER_TIMEOUT_MS = 60_000

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# The JupyterLab notebook panel on screen, once its kernel is up and idle.
NOTEBOOK_READY = """path => {
    const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    return Boolean(panel && panel.context && panel.context.path === path && panel.context.isReady
                   && panel.sessionContext.session && panel.sessionContext.session.kernel
                   && panel.sessionContext.kernelDisplayStatus === 'idle');
}"""

# `notebook:run-all-cells` resolves once every cell has run (true) or one has failed (false);
# the test then waits for that result and for the kernel to be idle.
RUN_ALL = """() => {
    window.courseRunAll = undefined;
    window.jupyterapp.commands.execute('notebook:run-all-cells')
        .then(ok => { window.courseRunAll = ok; }, () => { window.courseRunAll = false; });
}"""
RUN_ALL_DONE = """() => window.courseRunAll !== undefined
    && window.jupyterapp.shell.currentWidget.sessionContext.kernelDisplayStatus === 'idle'"""

# From the notebook model, not the page: JupyterLab may not attach off-screen cells to the DOM.
ERROR_OUTPUTS = """() => {
    const found = [];
    for (const cell of window.jupyterapp.shell.currentWidget.content.model.cells) {
        if (cell.type !== 'code') continue;
        for (const out of cell.toJSON().outputs) {
            if (out.output_type === 'error') found.push(`${out.ename}: ${out.evalue}`);
            if (out.output_type === 'stream' && out.name === 'stderr') {
                found.push(`stderr: ${[].concat(out.text).join('')}`);
            }
        }
    }
    return found;
}"""

# nbgrader's result dialog: per failed cell, a <pre> with its source and one with the error.
VALIDATION_FAILURES = """dialog => {
    const pres = [...dialog.querySelectorAll('.validation-failed > .jp-RenderedText > pre')];
    const pairs = [];
    for (let i = 0; i + 1 < pres.length; i += 2) {
        pairs.push({source: pres[i].innerText, error: pres[i + 1].innerText});
    }
    return pairs;
}"""


def _chromium() -> str:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser") or ""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="the browser test needs the playwright package: run `make setup`")
    executable = _chromium()
    if not executable:
        pytest.skip("the browser test needs Chromium: `apt-get install chromium` (Debian/Ubuntu), "
                    "or set CHROMIUM to a Chromium executable")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def lab(browser, tmp_path_factory):
    """One JupyterLab for the module, serving copies: Validate saves the notebook it checks."""
    served = tmp_path_factory.mktemp("served")
    for source, name in ((SOLUTION, "solution"), (RELEASED, "released")):
        target = served / name / source.name
        target.parent.mkdir()
        shutil.copy(source, target)
    with running_jupyterlab(served, tmp_path_factory.mktemp("jupyter")) as lab:
        yield lab


@pytest.fixture
def screenshot(tmp_path):
    """Save a screenshot of a page or an element; its paths are printed (pytest -s or -rP)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(target, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        target.screenshot(path=str(path))
        shutil.copy(path, ARTIFACTS / path.name)
        print(f"screenshot: {path} (copy: {ARTIFACTS / path.name})")
        return path

    return take


def _open_notebook(browser, lab, relative_path: str):
    """A new page showing the notebook, its kernel idle; returns (page, CSS id of its panel)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(RENDER_TIMEOUT_MS)
    page.goto(lab.notebook_url(relative_path))
    page.wait_for_function(NOTEBOOK_READY, arg=relative_path, timeout=RUN_TIMEOUT_MS)
    panel_id = page.evaluate("() => window.jupyterapp.shell.currentWidget.id")
    return page, f"#{panel_id}"


def test_phase_notebook_draws_widgets_figures_and_progress_bars(browser, lab, screenshot):
    page, panel = _open_notebook(browser, lab, f"solution/{SOLUTION.name}")
    try:
        page.evaluate(RUN_ALL)
        page.wait_for_function(RUN_ALL_DONE, timeout=RUN_TIMEOUT_MS, polling=500)
        errors = page.evaluate(ERROR_OUTPUTS)
        assert page.evaluate("() => window.courseRunAll") and not errors, (
            "running every cell failed or wrote to stderr:\n" + "\n".join(errors))

        # Outputs are drawn after the kernel is done: wait for each kind to appear.
        slider = page.locator(f"{panel} .widget-slider").first
        figure = page.locator(f"{panel} .js-plotly-plot").first
        # A tqdm notebook bar is an ipywidgets HBox holding a progress widget.
        progress_bar = page.locator(f"{panel} .widget-hbox:has(.widget-hprogress)").first
        # Plotly draws its SVG into the figure's div: an empty div means the extension is off.
        for drawn in (slider, figure.locator(".main-svg").first, progress_bar):
            drawn.wait_for(state="attached")

        stderr_outputs = page.locator(
            f'{panel} .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        assert stderr_outputs.count() == 0, stderr_outputs.all_inner_texts()

        for drawn, name in ((progress_bar, "progress"), (figure, "figure"), (slider, "widget")):
            output = drawn.locator("xpath=ancestor-or-self::div[contains(concat(' ', @class, ' '), "
                                   "' jp-OutputArea-output ')][1]")
            output.scroll_into_view_if_needed()
            screenshot(output, name)
        screenshot(page, "notebook")  # the explorer widget, in its place in the notebook
    finally:
        page.close()


def test_validate_button_names_the_failing_exercises(browser, lab, screenshot):
    released = nbformat.read(RELEASED, as_version=4)
    test_cells = {}  # whitespace-normalised source -> grade_id, for every graded test cell
    for cell in released.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade") and not meta.get("solution"):
            test_cells[_normalise(cell.source)] = meta["grade_id"]
    exercises = {grade_id.split("_")[0] for grade_id in test_cells.values()}

    page, panel = _open_notebook(browser, lab, f"released/{RELEASED.name}")
    try:
        page.locator(f"{panel} .validate-button").click()
        dialog = page.locator(".jp-Dialog", has_text="Validation Results")
        dialog.wait_for(timeout=RUN_TIMEOUT_MS)
        screenshot(page, "validate")
        assert dialog.locator(".validation-failed").count() == 1, dialog.inner_text()
        failures = dialog.evaluate(VALIDATION_FAILURES)

        failed_ids = {test_cells.get(_normalise(f["source"]), f["source"]) for f in failures}
        assert failed_ids == set(test_cells.values()), (
            "the dialog should list every test cell of the released notebook (all stubs)")
        assert {grade_id.split("_")[0] for grade_id in failed_ids} == exercises
        assert all("NotImplementedError" in f["error"] for f in failures), failures
    finally:
        page.close()


def _normalise(source: str) -> str:
    return "\n".join(line.strip() for line in source.splitlines() if line.strip())
