"""Run a notebook the way a student does (JupyterLab + headless Chromium), or headless via nbclient.

`run_in_browser` and `run_headless` return a NotebookReport; the caller decides what passes.
Every run works on a throw-away copy (outputs cleared) with its own kernel and run folder, and kills
every process it started (kernel, training ranks) before returning; a `Lab` (one JupyterLab server and
one Chromium) serves many browser runs, and stops both when it closes.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_ERRORS = ("Error displaying widget", "Error rendering widget", "Loading widget")
MARKER = "DISTLAB_NOTEBOOK_TEST"  # env var carried by every process a run starts, to reap leftovers
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class NotebookReport:
    """What one notebook run produced: error outputs, rendered views, problems, timing."""

    notebook: str
    mode: str  # "browser" or "headless"
    errors: list[dict] = field(default_factory=list)  # {cell, ename, evalue, traceback}
    widget_views: int = 0
    plotly_plots: int = 0
    problems: list[str] = field(default_factory=list)  # not-rendered outputs, timeout, dead kernel
    seconds: float = 0.0
    screenshot: Path | None = None
    cpu_seconds: float = 0.0  # kernel + ranks (+ server), sampled from /proc while Run All runs
    peak_rss_mb: float = 0.0  # their resident memory together, at its highest sample
    slowest_cells: list[tuple[int, float]] = field(default_factory=list)  # (cell, seconds), headless only

    def failures(self, min_widgets: int = 0, min_plots: int = 0) -> list[str]:
        """All reasons this run fails; counts are only checked in the browser, where they are real."""
        out = [f"cell {e['cell']}: {e['ename']}: {e['evalue']}" for e in self.errors] + self.problems
        if self.mode == "browser" and self.widget_views < min_widgets:
            out.append(f"only {self.widget_views} widget view(s) rendered, expected >= {min_widgets}")
        if self.mode == "browser" and self.plotly_plots < min_plots:
            out.append(f"only {self.plotly_plots} plotly plot(s) rendered, expected >= {min_plots}")
        return out

    def describe(self, min_widgets: int = 0, min_plots: int = 0) -> str:
        """A readable account for an assertion message: failures, tracebacks, counts, screenshot."""
        lines = [f"{self.notebook} ({self.mode}, {self.seconds:.0f}s): widget views={self.widget_views}, "
                 f"plotly plots={self.plotly_plots}, errors={len(self.errors)}"]
        lines += [f"  - {f}" for f in self.failures(min_widgets, min_plots)]
        for e in self.errors:
            lines += [f"  traceback of cell {e['cell']} ({e['ename']}):"] + [f"    {t}" for t in e["traceback"]]
        if self.slowest_cells:
            took = ", ".join(f"{cell} ({seconds:.0f} s)" for cell, seconds in self.slowest_cells)
            lines.append(f"  slowest cells: {took}")
        if self.screenshot:
            lines.append(f"  screenshot: {self.screenshot}")
        return "\n".join(lines)


def find_chromium() -> str | None:
    """Debian's Chromium, which the browser test drives (we never download one)."""
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")


# A student's first experiment: other world sizes. Run before the notebook's own cells, this makes every
# dl.launch (also the library's own) ask for another size; a function that refuses it (ranks.world_sizes,
# before any process starts) runs at the notebook's size, and each launch is logged to $DISTLAB_VARIED.
VARY_WORLD_SIZE = """
import json as _json, os as _os, sys as _sys
import distlab as _distlab
from distlab.ranks import WorldSizeError as _WorldSizeError

_launch = _sys.modules["distlab.launch"].launch

def _varied_launch(fn, world_size, *args, **kwargs):
    size = {2: 3, 3: 2, 4: 3}.get(world_size, world_size - 1)
    entry = {"function": getattr(fn, "__name__", "?"), "asked": world_size, "ran": size, "refused": None}
    try:
        run = _launch(fn, size, *args, **kwargs)
    except _WorldSizeError as refusal:
        entry.update(ran=world_size, refused=str(refusal))
        run = _launch(fn, world_size, *args, **kwargs)
    with open(_os.environ["DISTLAB_VARIED"], "a") as log:
        log.write(_json.dumps(entry) + "\\n")
    return run

_sys.modules["distlab.launch"].launch = _distlab.launch = _varied_launch
"""


def _working_copy(path: Path, tmp: Path, prelude: str | None = None, kernel: str = "python3") -> Path:
    """Copy the notebook's folder into tmp/work (so relative paths behave) and clear the copy's outputs;
    `prelude` becomes a first code cell; the copy runs on the kernelspec named `kernel`."""
    folder = shutil.copytree(path.parent, tmp / "work" / path.parent.name,
                             ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "runs"))
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    if prelude:
        nb.cells.insert(0, nbformat.v4.new_code_cell(prelude))
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, copy := Path(folder) / path.name)
    return copy


def _kernelspec(data_dir: Path, name: str = "python3", env: dict | None = None) -> Path:
    """A throw-away kernelspec that runs this very interpreter (the project's venv), with `env` added to
    the kernel's environment; returns the kernels folder."""
    kdir = data_dir / "kernels" / name
    kdir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3", "language": "python", "env": env or {}}
    (kdir / "kernel.json").write_text(json.dumps(spec))
    return kdir.parent


def _errors(nb: nbformat.NotebookNode) -> list[dict]:
    """Error outputs of a notebook, also those kept in Output widgets' saved state (nbclient records them)."""
    where = {out.data[WIDGET_MIME]["model_id"]: i for i, cell in enumerate(nb.cells)
             for out in cell.get("outputs", []) if WIDGET_MIME in out.get("data", {})}
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    outputs = [(i, out) for i, cell in enumerate(nb.cells) for out in cell.get("outputs", [])]
    outputs += [(where.get(mid, "?"), out) for mid, m in state.items() for out in m["state"].get("outputs", [])]
    found = []
    for i, out in outputs:
        if out["output_type"] == "error":
            tb = [ln for ln in ANSI.sub("", "\n".join(out["traceback"])).splitlines() if ln.strip()]
            found.append({"cell": i, "ename": out["ename"], "evalue": out["evalue"][:300], "traceback": tb[-6:]})
    return found


def _reap(tag: str) -> None:
    """Kill, by pid, any process still carrying this run's marker (kernels, training ranks)."""
    needle = f"{MARKER}={tag}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


class Usage:
    """CPU time and resident memory of every process carrying a run's marker, sampled from /proc.
    A process keeps the CPU time of its last sample after it exits (at most one interval lost)."""

    def __init__(self, tag: str):
        self.needle, self.marked, self.cpu, self.peak_rss = f"{MARKER}={tag}".encode(), {}, {}, 0
        self.tick, self.page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")

    def _is_marked(self, pid: str) -> bool:
        if pid not in self.marked:
            try:
                self.marked[pid] = self.needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                return False
        return self.marked[pid]

    def sample(self) -> None:
        rss = 0
        for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
            if not self._is_marked(pid):
                continue
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self.page
            except (OSError, IndexError):
                continue
            self.cpu[pid] = (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
        self.peak_rss = max(self.peak_rss, rss)

    def record(self, report: NotebookReport) -> None:
        report.cpu_seconds, report.peak_rss_mb = sum(self.cpu.values()), self.peak_rss / 2**20


def save_record(report: NotebookReport, executed: Path, folder: Path) -> None:
    """Keep an executed notebook (outputs, per-cell timing) and its run's figures for the course's
    timing table and site (distlab/course.py, book/)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(executed, folder / executed.name)
    fields = {k: getattr(report, k) for k in ("mode", "seconds", "cpu_seconds", "peak_rss_mb")}
    (folder / f"{executed.stem}.json").write_text(json.dumps(fields | {"failures": report.failures()}, indent=1))


POLL_SLICE = 1.0  # seconds: how long one wait for a kernel message may sleep before it looks again


def _poll_in_slices(channel) -> None:
    """Make a kernel channel's get_msg(timeout) wait in slices of POLL_SLICE seconds. pyzmq's asyncio poll
    can miss the wake-up for a message that has arrived: nbclient then waited out the cell's whole
    timeout (600 s, on notebook 07 at other world sizes) before finding the reply already there."""
    from queue import Empty

    get_msg = channel.get_msg

    async def sliced(timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_SLICE if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await get_msg(timeout=min(POLL_SLICE, left))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    channel.get_msg = sliced


class CellClock:
    """Seconds each cell took as the client saw it, from sending it to its last output (nbclient hooks)."""

    def __init__(self):
        self.started: dict[int, float] = {}
        self.took: dict[int, float] = {}

    def start(self, cell_index: int, **_) -> None:
        self.started[cell_index] = time.monotonic()

    def done(self, cell_index: int, **_) -> None:
        self.took[cell_index] = time.monotonic() - self.started.pop(cell_index, time.monotonic())

    def slowest(self, count: int = 3) -> list[tuple[int, float]]:
        return sorted(self.took.items(), key=lambda t: -t[1])[:count]


def run_headless(path: Path, timeout: float = 600, vary_world_size: Path | None = None) -> NotebookReport:
    """Execute a notebook with nbclient (no browser): catches errors, cannot see rendering.
    vary_world_size: a file; every launch then asks for another world size and is logged there."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    start, tag = time.monotonic(), secrets.token_hex(8)
    report = NotebookReport(str(path), "headless")
    with tempfile.TemporaryDirectory(prefix="nbtest_", ignore_cleanup_errors=True) as t:
        tmp = Path(t)
        copy = _working_copy(path, tmp, VARY_WORLD_SIZE if vary_world_size else None)
        km = AsyncKernelManager(kernel_name="python3",
                                kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(_kernelspec(tmp / "data"))]))
        nb = nbformat.read(copy, as_version=4)
        env = dict(os.environ, DISTLAB_RUNS=str(tmp / "runs"), DISTLAB_PROGRESS=str(tmp / "progress.jsonl"),
                   IPYTHONDIR=str(tmp / "ipython"), DISTLAB_AUDIT="1", DISTLAB_VARIED=str(vary_world_size or ""),
                   **{MARKER: tag})
        clock = CellClock()

        def on_start(**_):
            _poll_in_slices(client.kc.shell_channel)
            _poll_in_slices(client.kc.iopub_channel)

        client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=True, on_notebook_start=on_start,
                                on_cell_start=clock.start, on_cell_executed=clock.done,
                                resources={"metadata": {"path": str(copy.parent)}})
        try:
            client.execute(env=env)
        except Exception as e:  # timeout, dead kernel
            report.problems.append(f"{type(e).__name__}: {str(e)[:500]}")
        finally:
            _reap(tag)
        report.errors = _errors(nb)
        report.slowest_cells = clock.slowest()
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                report.widget_views += WIDGET_MIME in out.get("data", {})
                report.plotly_plots += PLOTLY_MIME in out.get("data", {})
    report.seconds = time.monotonic() - start
    return report


# ---------------------------------------------------------------------------------------- browser
JS_STATE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!w || !w.content || !w.sessionContext) return null;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  const code = w.content.widgets.filter(c => c.model.type === 'code' && c.model.sharedModel.getSource().trim());
  const outs = c => Array.from({length: c.model.outputs.length}, (_, i) => c.model.outputs.get(i).type);
  const died = (window.__statuses || []).some(s => ['dead', 'autorestarting', 'restarting'].includes(s));
  const dialog = document.querySelector('.jp-Dialog');
  return {kernel: k ? k.status : null, total: code.length, died: died, dialog: dialog && dialog.innerText,
          ran: code.filter(c => c.model.executionCount !== null && c.model.executionState !== 'running').length,
          errored: code.some(c => outs(c).includes('error'))};
}"""
# Per notebook cell (null for non-code), per output: what is drawn on screen.
JS_FACTS = """() => window.jupyterapp.shell.currentWidget.content.widgets.map(c => c.model.type !== 'code' ? null :
  Array.from(c.outputArea.widgets).map(child => {
    const n = child.node, out = n.querySelector('.jp-OutputArea-output');
    const big = e => { const b = e.getBoundingClientRect(); return b.width > 2 && b.height > 2; };
    const plots = Array.from(n.querySelectorAll('.js-plotly-plot'));
    const nested = Array.from(n.querySelectorAll(
        '.jupyter-widgets .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'));
    return {mime: out ? out.getAttribute('data-mime-type') || '' : null, text: (n.innerText || '').slice(0, 300),
            widget: !!n.querySelector('.jupyter-widgets') || (!!out && Array.from(out.querySelectorAll('*')).some(big)),
            plots: plots.filter(p => p.querySelector('svg.main-svg') && big(p)).length, divs: plots.length,
            nested: nested.map(e => e.innerText).filter(t => t.includes('Traceback')).map(t => t.slice(-600))};
  }))"""
JS_RECORD_STATUS = """() => { window.__statuses = [];  // a dead kernel restarts fast: keep its history
  window.jupyterapp.shell.currentWidget.sessionContext.statusChanged.connect((_, s) => window.__statuses.push(s)); }"""
JS_OVERFLOW = """() => { const o = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer');
  if (!o) return 0; o.scrollTop = 0; return o.scrollHeight - o.clientHeight; }"""  # also scrolls to the top


def _api(base: str, token: str, method: str, route: str) -> object:
    """Call the Jupyter server's REST API (bounded)."""
    req = urllib.request.Request(base + route, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def _start_lab(tmp: Path, root: Path, token: str, tag: str) -> tuple[subprocess.Popen, str]:
    """Start JupyterLab on a free localhost port with throw-away dirs; wait until it answers."""
    settings = {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none", "scrollPastEnd": False,
                                                            "recordTiming": True},  # per-cell times, saved
                "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}
    for plugin, values in settings.items():  # draw every cell; no news or update toasts over the screenshot
        (file := tmp / "settings" / f"{plugin}.jupyterlab-settings").parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(values))
    data = _kernelspec(tmp / "data").parent
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               JUPYTER_DATA_DIR=str(data), JUPYTER_PATH=str(data), JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"), IPYTHONDIR=str(tmp / "ipython"),
               JUPYTER_PLATFORM_DIRS="1", **{MARKER: tag})  # each kernel's own env: Lab.run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    cmd += ["--allow-root"] if os.geteuid() == 0 else []
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                argv = _api(base, token, "GET", "/api/kernelspecs")["kernelspecs"]["python3"]["spec"]["argv"]
                break
            except OSError:
                time.sleep(0.3)
        else:
            raise RuntimeError("JupyterLab did not start:\n" + (tmp / "server.log").read_text(errors="replace")[-2000:])
        if argv[0] != sys.executable:  # the kernel must be this interpreter, not some other python3
            raise RuntimeError(f"JupyterLab's python3 kernel runs {argv[0]}, not {sys.executable}")
        return proc, base
    except BaseException:
        _stop_lab(proc, base, token)
        raise


def _shut_kernels(base: str, token: str) -> None:
    """Ask the server to shut every kernel down (best effort: whatever stays is reaped by its marker)."""
    try:
        for k in _api(base, token, "GET", "/api/kernels"):
            _api(base, token, "DELETE", f"/api/kernels/{k['id']}")
    except Exception:
        pass


def _stop_lab(proc: subprocess.Popen, base: str, token: str) -> None:
    """Shut kernels down politely, then the server (SIGTERM, then SIGKILL), all bounded."""
    if proc.poll() is None:
        _shut_kernels(base, token)  # the server shuts what is left down on SIGTERM too
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_until_done(page, timeout: float, report: NotebookReport, usage: Usage) -> None:
    """Poll the notebook model until the kernel is idle and every cell ran (or Run All stopped at an error)."""
    deadline, stable, st = time.monotonic() + timeout, 0, None
    while time.monotonic() < deadline:
        usage.sample()
        st = page.evaluate(JS_STATE) or {}
        if st.get("died") or st.get("kernel") == "dead":
            report.problems.append("the kernel died during Run All")
        if st.get("dialog"):
            report.problems.append("dialog: " + " ".join(st["dialog"].split())[:200])
        if st.get("died") or st.get("dialog") or st.get("kernel") == "dead":
            return
        done = st.get("kernel") == "idle" and (st["ran"] == st["total"] or st["errored"])
        stable = stable + 1 if done else 0
        if stable >= 3:
            return
        time.sleep(0.5)
    report.problems.append(f"Run All not finished after {timeout:.0f}s (state {st})")


def _check_outputs(nb: nbformat.NotebookNode, facts: list) -> tuple[int, int, list[str], list[dict]]:
    """Pair each saved output with what is drawn: count widget views and plots, list what did not render."""
    views, plots, problems, nested = 0, 0, [], []
    for i, (cell, drawn) in enumerate(zip(nb.cells, facts)):
        for j, out in enumerate(cell.get("outputs", []) if drawn is not None else []):
            f = drawn[j] if j < len(drawn) else {"mime": None, "text": "", "widget": False, "plots": 0, "divs": 0}
            data, text = out.get("data", {}), f["text"][:80].replace("\n", " ")
            plots += f["plots"]
            if f["divs"] > f["plots"]:
                problems.append(f"cell {i}: plotly plot without SVG: {text!r}")
            if WIDGET_MIME in data:
                bad = next((e for e in WIDGET_ERRORS if e in f["text"]), None)
                if bad or not f["widget"] or f["mime"] not in ("", WIDGET_MIME):
                    problems.append(f"cell {i}: widget not rendered ({bad or f['mime']}): {text!r}")
                else:
                    views += 1
            elif PLOTLY_MIME in data and not f["plots"]:
                problems.append(f"cell {i}: plotly figure not rendered: {text!r}")
        for f in drawn or []:
            nested += [{"cell": i, "ename": "traceback inside a widget", "evalue": t.splitlines()[-1],
                        "traceback": t.splitlines()[-6:]} for t in f["nested"]]
    return views, plots, problems, nested


def _drive(page, url: str, copy: Path, timeout: float, report: NotebookReport, usage: Usage) -> None:
    """Open the notebook, click Run > Run All Cells, wait, save, then compare the saved model with the page."""
    page.goto(url, timeout=120_000)
    page.wait_for_function(f"() => {{ const s = ({JS_STATE})(); return s && s.kernel === 'idle'; }}",
                           timeout=120_000, polling=500)
    page.evaluate(JS_RECORD_STATUS)
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
    _wait_until_done(page, timeout, report, usage)
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    nb = nbformat.read(copy, as_version=4)
    deadline, last, stable = time.monotonic() + 30, None, 0
    while time.monotonic() < deadline:  # widget views and plots draw asynchronously: wait till stable
        now = _check_outputs(nb, page.evaluate(JS_FACTS))
        stable = stable + 1 if now == last else 0
        last = now
        if stable >= 3 and not now[2]:
            break
        time.sleep(0.5)
    report.widget_views, report.plotly_plots, problems, nested = last
    report.errors, report.problems = _errors(nb) + nested, report.problems + problems


def _screenshot(page, path: Path) -> None:
    """Make the window as tall as the notebook (it scrolls inside the page) and save a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1280, "height": min(900 + page.evaluate(JS_OVERFLOW), 16000)})
    time.sleep(1.0)  # plots re-layout to the new size
    page.evaluate(JS_OVERFLOW)
    page.screenshot(path=str(path), full_page=True)


class Lab:
    """One JupyterLab server and one headless Chromium, shared by the notebooks run through it.

    Each notebook still gets its own: working copy, kernelspec (whose env carries the notebook's marker,
    run folder and progress file), JupyterLab workspace, browser context; after it, its kernel and every
    process carrying its marker are stopped. Starting a server and a browser per notebook cost about 6 s
    each time on a 2-core machine."""

    def __init__(self):
        self.tag, self.token = secrets.token_hex(8), secrets.token_hex(24)
        self._tmp = tempfile.TemporaryDirectory(prefix="nbtest_", ignore_cleanup_errors=True)
        self.tmp = Path(self._tmp.name)
        (self.tmp / "work").mkdir()  # the server's root: a folder per notebook run inside
        self._proc = self._pw = None

    def __enter__(self) -> Lab:
        from playwright.sync_api import sync_playwright

        try:
            self._proc, self.base = _start_lab(self.tmp, self.tmp / "work", self.token, self.tag)
            self._pw = sync_playwright().start()
            self.browser = self._pw.chromium.launch(executable_path=find_chromium(), headless=True,
                                                    args=CHROMIUM_FLAGS)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_) -> None:
        try:
            if self._pw is not None:
                self._pw.stop()  # closes the browser too
        finally:
            if self._proc is not None:
                _stop_lab(self._proc, self.base, self.token)
            _reap(self.tag)
            self._tmp.cleanup()

    def run(self, path: Path, timeout: float = 600, screenshot: Path | None = None,
            keep: Path | None = None) -> NotebookReport:
        start, tag = time.monotonic(), secrets.token_hex(8)
        report, usage = NotebookReport(str(path), "browser"), Usage(tag)
        own, kernel = self.tmp / "work" / tag, f"distlab-{tag}"
        env = {"DISTLAB_RUNS": str(own / "runs"), "DISTLAB_PROGRESS": str(own / "progress.jsonl"),
               "DISTLAB_AUDIT": "1", MARKER: tag}
        _kernelspec(self.tmp / "data", kernel, env)
        copy = _working_copy(path, own, kernel=kernel)
        context = self.browser.new_context(viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            url = f"{self.base}/lab/workspaces/{tag}/tree/{copy.relative_to(self.tmp / 'work')}?token={self.token}"
            try:
                _drive(page, url, copy, timeout, report, usage)
            except Exception as e:  # page never loaded, menu missing, ...: report it with a screenshot
                report.problems.append(f"harness: {type(e).__name__}: {str(e)[:500]}")
            if screenshot:
                try:
                    _screenshot(page, screenshot)
                    report.screenshot = screenshot
                except Exception as e:
                    report.problems.append(f"screenshot failed: {type(e).__name__}: {str(e)[:300]}")
        finally:
            context.close()
            _shut_kernels(self.base, self.token)
            _reap(tag)
        report.seconds = time.monotonic() - start
        usage.record(report)
        if keep:
            save_record(report, copy, keep)
        return report


def run_in_browser(path: Path, timeout: float = 600, screenshot: Path | None = None,
                   keep: Path | None = None, lab: Lab | None = None) -> NotebookReport:
    """Open a copy of the notebook in JupyterLab in headless Chromium, Run All Cells, check the page.
    keep: a folder to save the executed notebook and its timing in (save_record). lab: a running Lab to
    use (else one is started for this notebook alone)."""
    if lab is not None:
        return lab.run(path, timeout, screenshot, keep)
    with Lab() as own:
        return own.run(path, timeout, screenshot, keep)
