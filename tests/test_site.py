"""The course as a website: `book/build.py` builds it from executed notebooks, headless Chromium reads it.

CI's browser test saves every notebook it ran to build/executed/; this test (run last, see conftest.py)
builds the site from those. Run alone, it executes headless the notebooks whose saved copy is missing or
older than the notebook. Then every page is served from 127.0.0.1 and opened offline.
"""
from __future__ import annotations

import functools
import http.server
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat
import pytest

from notebook_browser import CHROMIUM_FLAGS, MARKER, PLOTLY_MIME, _kernelspec, _reap, _working_copy, find_chromium

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
DOCS = REPO / "docs"
EXECUTED = REPO / "build" / "executed"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
TRACEBACK = "Traceback (most recent call last)"
JS_PAGE = """() => {
  const plots = Array.from(document.querySelectorAll('.js-plotly-plot'));
  const article = document.querySelector('article') || document.body;
  return {plots: plots.filter(p => p.querySelector('svg.main-svg')).length, divs: plots.length,
          text: document.body.innerText, tracebacks: document.querySelectorAll('.traceback').length,
          links: Array.from(article.querySelectorAll('a[href]')).map(a => a.href.split('#')[0])};
}"""


def has_code(path: Path) -> bool:
    return any(c.cell_type == "code" and c.source.strip() for c in nbformat.read(path, as_version=4).cells)


def execute(path: Path, into: Path, timeout: float = 600) -> None:
    """Run a notebook headless as notebook_browser.run_headless does, and keep the executed copy."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    tag = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="sitetest_", ignore_cleanup_errors=True) as t:
        tmp = Path(t)
        copy = _working_copy(path, tmp)
        km = AsyncKernelManager(kernel_name="python3",
                                kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(_kernelspec(tmp / "data"))]))
        nb = nbformat.read(copy, as_version=4)
        env = dict(os.environ, DISTLAB_RUNS=str(tmp / "runs"), DISTLAB_PROGRESS=str(tmp / "progress.jsonl"),
                   IPYTHONDIR=str(tmp / "ipython"), DISTLAB_AUDIT="1", **{MARKER: tag})
        try:
            NotebookClient(nb, km=km, timeout=timeout, allow_errors=True,
                           resources={"metadata": {"path": str(copy.parent)}}).execute(env=env)
        finally:
            _reap(tag)
    nbformat.write(nb, into / path.name)


def executed_notebooks(into: Path) -> Path:
    """build/executed when it holds every notebook, fresh; else a folder with the stale ones run here."""
    stale = [p for p in sorted(NOTEBOOKS.glob("*.ipynb")) if has_code(p) and not (
        (EXECUTED / p.name).exists() and (EXECUTED / p.name).stat().st_mtime >= p.stat().st_mtime)]
    if not stale:
        return EXECUTED
    into.mkdir()
    for done in EXECUTED.glob("*.ipynb") if EXECUTED.is_dir() else []:
        if done.name not in {p.name for p in stale}:
            (into / done.name).write_bytes(done.read_bytes())
    for path in stale:
        execute(path, into)
    return into


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    """A notebook's outputs: in its cells, and in its Output widgets' saved state."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    found = [out for cell in nb.cells for out in cell.get("outputs", [])]
    return found + [out for m in state.values() if m.get("model_name") == "OutputModel"
                    for out in m["state"].get("outputs", [])]


def expected_on_page(path: Path) -> dict:
    """From an executed notebook: its plotly figures, and the tracebacks it prints on purpose (a failing rank's,
    shown to teach what a failure looks like: stream and text outputs, never an error output)."""
    if not path.exists():  # a docs page
        return {"plotly_outputs": 0, "printed_tracebacks": 0}
    found = outputs(nbformat.read(path, as_version=4))
    text = "".join(out.get("text", "") + out.get("data", {}).get("text/plain", "") for out in found
                   if out["output_type"] != "error")
    return {"plotly_outputs": sum(PLOTLY_MIME in out.get("data", {}) for out in found),
            "printed_tracebacks": text.count(TRACEBACK)}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, Path, float]:
    """(the built site's folder, the executed notebooks it was built from, build seconds)."""
    tmp = tmp_path_factory.mktemp("site")
    executed = executed_notebooks(tmp / "executed")
    start = time.monotonic()
    cmd = [sys.executable, str(REPO / "book" / "build.py"), "--executed", str(executed), "--out", str(tmp / "book"),
           "--notebooks", str(NOTEBOOKS), "--docs", str(DOCS)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"book/build.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return tmp / "book" / "html", executed, time.monotonic() - start


@pytest.fixture(scope="module")
def server(site):
    """The site served over HTTP on 127.0.0.1 from a thread, for the length of the module."""
    handler = functools.partial(QuietHandler, directory=str(site[0]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def pages(site_dir: Path) -> list[str]:
    """Every page of the course: the notebooks (the map too) and the docs pages."""
    return [f"notebooks/{p.stem}.html" for p in sorted(NOTEBOOKS.glob("*.ipynb"))] + \
           [f"docs/{p.stem}.html" for p in sorted(DOCS.glob("*.md"))]


@pytest.fixture(scope="module")
def visits(site, server) -> dict[str, dict]:
    """Open each page in headless Chromium, offline (only 127.0.0.1 answers), and record what it shows."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    assert find_chromium(), "the site test needs chromium: apt-get install -y chromium"
    site_dir, executed, _ = site
    facts, start = {}, time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            outside, js_errors = [], []

            def local_only(route) -> None:
                if route.request.url.startswith(server):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", local_only)
            page.on("pageerror", lambda e: js_errors.append(str(e)[:300]))
            for rel in pages(site_dir):
                outside.clear()
                js_errors.clear()
                expected = expected_on_page(executed / rel.replace("notebooks/", "").replace(".html", ".ipynb"))
                response = page.goto(f"{server}/{rel}", wait_until="load", timeout=120_000)
                wanted = f"() => ({JS_PAGE})().plots >= {expected['plotly_outputs']}"
                try:  # plots draw after load: wait until the expected number is there (bounded)
                    page.wait_for_function(wanted, timeout=60_000, polling=250)
                except PlaywrightTimeout:  # fewer plots than expected: the test below says which page
                    pass
                facts[rel] = page.evaluate(JS_PAGE) | expected | {
                    "status": response.status if response else None,
                    "outside": list(outside), "js_errors": list(js_errors)}
        finally:
            browser.close()
    print(f"\n{len(facts)} pages opened in {time.monotonic() - start:.0f}s")
    return facts


@pytest.mark.timeout(3600)  # run alone, it first executes the notebooks (CI: a build and 20 pages, ~2 min)
def test_every_page_renders_its_figures(site, visits) -> None:
    """Each notebook's page loads, draws at least as many plotly plots as its executed copy holds, every one
    with its SVG, shows no error output nor traceback beyond those the notebook prints, and throws no
    script error."""
    failures = []
    for rel, f in visits.items():
        if f["status"] != 200:
            failures.append(f"{rel}: HTTP {f['status']}")
        if f["plots"] < f["plotly_outputs"] or f["divs"] > f["plots"]:
            failures.append(f"{rel}: {f['plots']} plotly plot(s) drawn ({f['divs']} divs), "
                            f"its executed notebook holds {f['plotly_outputs']}")
        if f["tracebacks"] or f["text"].count(TRACEBACK) > f["printed_tracebacks"]:
            failures.append(f"{rel}: a Python traceback is on the page ({f['tracebacks']} error output(s); "
                            f"{f['text'].count(TRACEBACK)} in the text, {f['printed_tracebacks']} printed on purpose)")
        failures += [f"{rel}: script error: {e}" for e in f["js_errors"]]
    assert not failures, "\n".join(failures)
    assert sum(f["plotly_outputs"] for f in visits.values()) > 0, "no plotly figure in any executed notebook"
    print(f"site built in {site[2]:.0f}s; {len(visits)} pages, "
          f"{sum(f['plots'] for f in visits.values())} plotly plots drawn")


def test_site_works_offline(visits) -> None:
    """No page asks for anything beyond the site itself (plotly.js is bundled; no CDN, no fonts online)."""
    outside = {rel: f["outside"] for rel, f in visits.items() if f["outside"]}
    assert not outside, f"pages request outside 127.0.0.1: {outside}"


def test_glossary_and_guide_are_in_the_site_and_linked_from_the_map(site, server, visits) -> None:
    """The map (index) links, in its own text, to the glossary and the instructor guide, which render."""
    for rel in ("docs/glossary.html", "docs/instructor.html"):
        assert (site[0] / rel).exists(), f"{rel} not built"
        assert visits[rel]["status"] == 200 and len(visits[rel]["text"]) > 200, f"{rel} is empty"
        assert f"{server}/{rel}" in visits["notebooks/index.html"]["links"], f"the map does not link to {rel}"
    assert "rank" in visits["docs/glossary.html"]["text"] and "参数服务器" in visits["docs/glossary.html"]["text"]
