"""Every notebook in notebooks/ runs top to bottom the way a student runs it, with nothing broken on screen.

With Chromium: real JupyterLab in headless Chromium (Run All Cells, then errors, widget views and
plotly plots are checked, and a screenshot is saved). Without it: nbclient runs the notebook and only
error outputs are checked, except on CI, where a missing browser is a failure.
"""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

from notebook_browser import Lab, find_chromium, run_headless, run_in_browser

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TIMEOUT = float(os.environ.get("DISTLAB_NOTEBOOK_TIMEOUT", "600"))  # seconds for Run All, per notebook
SCREENSHOTS = Path(os.environ.get("DISTLAB_SCREENSHOTS", REPO / "build" / "screenshots"))
EXECUTED = REPO / "build" / "executed"  # each notebook as the browser ran it, with its timing: the site and
# the course's timing table (distlab/course.py) are built from these



def expected_on_screen(notebook: Path) -> dict:
    """What must be on screen after Run All, from the notebook's own metadata["distlab"]."""
    said = nbformat.read(notebook, as_version=4).metadata.get("distlab", {})
    return {key: said[key] for key in ("min_widgets", "min_plots") if key in said}


@pytest.fixture(scope="module")
def lab():
    """One JupyterLab server and Chromium for every notebook (None without Chromium)."""
    if not find_chromium():
        yield None
        return
    with Lab() as running:
        yield running


@pytest.mark.timeout(TIMEOUT + 400)  # Run All plus JupyterLab/kernel start-up and teardown
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_clean(notebook: Path, lab: Lab | None) -> None:
    """Run All Cells must finish with no error output, every widget and plot rendered."""
    expect = expected_on_screen(notebook)
    if lab is not None:
        report = run_in_browser(notebook, TIMEOUT, SCREENSHOTS / f"{notebook.stem}.png", keep=EXECUTED, lab=lab)
        print(f"screenshot: {report.screenshot}")
    elif os.environ.get("CI") == "true":
        pytest.fail("CI needs chromium: apt-get install -y chromium")
    else:
        report = run_headless(notebook, TIMEOUT)
    if report.failures(**expect):
        pytest.fail(report.describe(**expect), pytrace=False)


@pytest.mark.timeout(30)
def test_a_message_whose_wake_up_was_missed_is_found_within_a_slice_not_at_the_timeout():
    """The harness's guard against pyzmq's missed wake-ups (notebook_browser._poll_in_slices)."""
    import asyncio
    import time
    from concurrent.futures import ThreadPoolExecutor
    from queue import Empty

    from notebook_browser import POLL_SLICE, _poll_in_slices

    class MissesWakeUps:
        """A channel whose message arrives at once, but whose poll only notices it when its timeout ends."""

        async def get_msg(self, timeout=None):
            await asyncio.sleep(timeout)
            if time.monotonic() - began > 0.05:
                return {"msg": "reply"}
            raise Empty

    def run(coroutine):  # on a thread of its own: the module's Lab keeps Playwright's event loop on this one
        with ThreadPoolExecutor(1) as thread:
            return thread.submit(asyncio.run, coroutine).result()

    channel = MissesWakeUps()
    _poll_in_slices(channel)
    began = time.monotonic()
    assert run(channel.get_msg(timeout=600)) == {"msg": "reply"}
    assert time.monotonic() - began < 2 * POLL_SLICE
    with pytest.raises(Empty):  # a message that never comes still times out
        began = time.monotonic() + 3600
        run(channel.get_msg(timeout=0.3))
