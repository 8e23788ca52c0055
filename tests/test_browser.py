"""The course as a student sees it: JupyterLab in a real (headless) browser.

Executing a notebook with nbclient proves the code runs, not that the student sees anything:
a missing lab extension leaves a plotly figure or a widget silently blank. Here JupyterLab runs
the Phase 1 notebook in Chromium, and the test looks at the page: sliders, plotly figures and
tqdm bars drawn, no error output; then nbgrader's Validate button on a released notebook. Last, the
instructor's side: Formgrader on an autograded submission of a miniature course, a written answer
scored and commented, feedback generated, and the score in the export.

Needs the `playwright` package (a project dependency) and a Chromium build on the machine
(`apt-get install chromium`; Playwright's own browser download needs internet). Without either,
the tests skip. Screenshots go to pytest's temporary folder and to tests/artifacts/browser/.
"""

from __future__ import annotations

import os
import re
import shutil
import time
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
        # Unanswered written questions are listed too ("You did not provide a response"): one per answer cell.
        written = [f for f in failures if "did not provide a response" in f["error"]]
        answers = [c for c in released.cells if c.cell_type == "markdown" and c.metadata.get("nbgrader", {}).get("grade")]
        assert len(written) == len(answers), failures
        failures = [f for f in failures if f not in written]

        failed_ids = {test_cells.get(_normalise(f["source"]), f["source"]) for f in failures}
        assert failed_ids == set(test_cells.values()), (
            "the dialog should list every test cell of the released notebook (all stubs)")
        assert {grade_id.split("_")[0] for grade_id in failed_ids} == exercises
        assert all("NotImplementedError" in f["error"] for f in failures), failures
    finally:
        page.close()


def _normalise(source: str) -> str:
    return "\n".join(line.strip() for line in source.splitlines() if line.strip())


# ---------------------------------------------------------------------------------------------
# The instructor's side: a written answer graded by hand in Formgrader (nbgrader's lab extension).

FORMGRADER_FRAME = "#formgrader-iframe iframe"


@pytest.fixture(scope="module")
def graded_course(browser, tmp_path_factory):
    """A temporary course (tests/test_manual_grading.py's miniature phase) with one collected and
    autograded submission whose written answer awaits a person."""
    from test_manual_grading import NOTEBOOK, PHASE, build_course, instructor, submissions

    root = tmp_path_factory.mktemp("formgrader") / "course"
    build_course(root)
    release = nbformat.read(root / "course" / PHASE / f"{NOTEBOOK}.ipynb", as_version=4)
    inbox = root.parent / "inbox"
    (inbox / "ann").mkdir(parents=True)
    nbformat.write(submissions(release)["ann"], inbox / "ann" / f"{NOTEBOOK}.ipynb")
    for step in (["collect", str(inbox), "--phase", PHASE], ["autograde"]):
        result = instructor(root, *step)
        assert result.returncode == 0, result.stdout + result.stderr
    return root


def _wait_for_grade(root, student, expected, seconds=60):
    """The written answer's gradebook entry once it equals ``expected`` (Formgrader saves by ajax)."""
    from test_manual_grading import written_grade

    deadline = time.monotonic() + seconds
    while True:
        grade = written_grade(root, student)
        if all(grade[k] == v for k, v in expected.items()) or time.monotonic() > deadline:
            return grade
        time.sleep(0.2)  # polling the gradebook for the saved value, not waiting a fixed time


def test_formgrader_grades_a_written_answer_into_feedback_and_export(browser, graded_course, tmp_path_factory,
                                                                     screenshot):
    from test_manual_grading import (ANN_ANSWER, COMMENT, MODEL_ANSWER, NOTEBOOK, PHASE, RUBRIC, WRITTEN,
                                     export, feedback_text)

    root = graded_course
    started = time.monotonic()
    with running_jupyterlab(root, tmp_path_factory.mktemp("jupyter-formgrader"), cwd=root) as lab:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(RENDER_TIMEOUT_MS)
        try:
            page.goto(lab.lab_url())
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.commands"
                                   ".hasCommand('nbgrader:open-formgrader')", timeout=RUN_TIMEOUT_MS)
            # The menu's Nbgrader > Formgrader, as the instructor opens it.
            page.evaluate("() => window.jupyterapp.commands.execute('nbgrader:open-formgrader')")
            frame = page.frame_locator(FORMGRADER_FRAME)
            frame.get_by_role("link", name="Manual Grading").click()
            frame.get_by_role("link", name=PHASE, exact=True).click()
            frame.get_by_role("link", name=NOTEBOOK, exact=True).click()
            frame.get_by_role("link", name="Submission #1").click()
            score = frame.locator(f"input.score#{WRITTEN}")
            score.wait_for()
            frame.get_by_text(ANN_ANSWER).wait_for()  # the student's answer, to read before scoring

            # Formgrader's own answer to a bad score: it flashes the box and saves the bound instead.
            score.fill("99")
            score.press("Tab")
            assert _wait_for_grade(root, "ann", {"manual": 2.0})["manual"] == 2.0, "99 was not clamped to 2"
            score.fill("-1")
            score.press("Tab")
            assert _wait_for_grade(root, "ann", {"manual": 0.0})["manual"] == 0.0, "-1 was not clamped to 0"

            score.fill("1.5")
            score.press("Tab")
            comment = frame.locator(f"textarea#{WRITTEN}-comment")
            comment.fill(COMMENT)
            comment.press("Tab")
            grade = _wait_for_grade(root, "ann", {"manual": 1.5, "comment": COMMENT})
            assert (grade["manual"], grade["comment"], grade["needs_manual_grade"]) == (1.5, COMMENT, False), grade
            comment.scroll_into_view_if_needed()
            screenshot(page, "formgrader")

            # Generate feedback from Formgrader's Manage Assignments page.
            frame.get_by_role("link", name="Manual Grading").click()  # the breadcrumb, back to the menu
            frame.get_by_role("link", name="Manage Assignments").click()
            frame.locator("tr", has_text=PHASE).locator(".generate-feedback a").click()
            frame.get_by_text(f"Successfully generated feedback of '{PHASE}'").wait_for(timeout=RUN_TIMEOUT_MS)

            feedback = root / "autograde" / "feedback" / "ann" / PHASE / f"{NOTEBOOK}.html"
            text = feedback_text(root, "ann")
            assert COMMENT in text and ANN_ANSWER in text, "the grader's comment is not in the feedback"
            assert re.search(r"1\.5\s*/\s*2", text), "the manual score is not in the feedback"
            assert MODEL_ANSWER not in text and RUBRIC not in text and "Rubric" not in text
            page.goto(feedback.as_uri())
            page.get_by_text(COMMENT).scroll_into_view_if_needed()
            screenshot(page, "feedback")
        finally:
            page.close()
    seconds = time.monotonic() - started
    row = export(root, "grades.csv")["ann"]
    assert (row["manual_points"], row["written_ungraded"]) == ("1.5", "0"), row
    print(f"formgrader flow (server start to feedback): {seconds:.0f} s")
