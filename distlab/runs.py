"""The run folder: everything a launch leaves on disk, and `Run`, the object that reads it.

    runs/<time>-<name>/
      config.json            what was launched, where, and its status (running, ok, failed, ...)
      metrics/rank<r>.jsonl  ctx.log rows, flushed line by line by the rank itself
      comm/rank<r>.jsonl     one row per communication op
      logs/rank<r>.log       the rank's stdout and stderr
      results/rank<r>.pkl    what the function returned (cloudpickle)
      stacks/rank<r>.txt     where each rank's Python threads were when a timeout struck (faulthandler)
      failure.txt            the root-cause rank and its traceback, when one failed
      progress.json          total steps, when the function said (ctx.set_total)

This module owns the layout: every path above is made here and every file is written through a
function here, by whichever process writes it (the launcher, or the rank itself so that nothing is
lost when the launcher dies). pandas is imported only when a DataFrame is asked for: ranks never pay
for it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path

import cloudpickle

RUNS_ROOT_ENV = "DISTLAB_RUNS"
PER_RANK = {"metrics": ".jsonl", "comm": ".jsonl", "logs": ".log", "results": ".pkl", "stacks": ".txt"}  # suffixes


def runs_folder(root: str | os.PathLike | None = None) -> Path:
    """Where run folders go: `root`, else $DISTLAB_RUNS, else ./runs."""
    return Path(root or os.environ.get(RUNS_ROOT_ENV, "runs"))


def new_run_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """A new, empty run folder under `runs_folder(root)`; never one that exists (two runs never merge)."""
    while True:
        path = runs_folder(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{secrets.token_hex(4)}"
        try:
            return make_run_dir(path, new=True)
        except FileExistsError:
            continue


def make_run_dir(path: str | os.PathLike, new: bool = False) -> Path:
    """Create the folder, readable by this user only: logs and results can hold anything. `new`: it must
    not exist yet (torchrun's ranks share one folder, so they pass new=False)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(exist_ok=not new)
    path.chmod(0o700)
    for sub in PER_RANK:
        (path / sub).mkdir(exist_ok=True)
    return path


def rank_file(run_dir: str | os.PathLike, kind: str, rank: int) -> Path:
    """One rank's file of a kind: metrics/rank3.jsonl, comm/rank3.jsonl, logs/rank3.log, results/rank3.pkl."""
    return Path(run_dir) / kind / f"rank{rank}{PER_RANK[kind]}"


def append_lines(run_dir: str | os.PathLike, kind: str, rank: int):
    """A line-buffered file to append to (metrics, comm, logs): each complete line reaches the disk at once."""
    path = rank_file(run_dir, kind, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", buffering=1)


def write_config(run_dir: str | os.PathLike, **fields) -> None:
    """Create or update config.json (atomically: a reader never sees half a file)."""
    path = Path(run_dir) / "config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    _write_atomically(path, json.dumps({**config, **fields}, indent=1, default=repr).encode())


def write_failure(run_dir: str | os.PathLike, rank: int, details: str) -> None:
    """failure.txt: the root-cause rank on the first line, then its traceback."""
    _write_atomically(Path(run_dir) / "failure.txt", f"rank {rank}\n{details}".encode())


def write_progress(run_dir: str | os.PathLike, total_steps: int) -> None:
    """progress.json, which the progress bar reads while the ranks run."""
    _write_atomically(Path(run_dir) / "progress.json", json.dumps({"total_steps": int(total_steps)}).encode())


def save_result(run_dir: str | os.PathLike, rank: int, result) -> None:
    """Written by the rank itself, so results survive the launching process."""
    _write_atomically(rank_file(run_dir, "results", rank), cloudpickle.dumps(result))


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a reader never sees half a file


def _read_jsonl(files) -> list[dict]:
    rows = []
    for path in files:
        with open(path) as f:
            rows.extend(json.loads(line) for line in f if line.endswith("\n"))  # skip a half-written line
    return rows


class Run:
    """A launch, running or finished. `dl.load_run(path)` gives the same object for an old run."""

    def __init__(self, path: str | os.PathLike):
        self.dir = Path(path)
        if not (self.dir / "config.json").exists():
            raise FileNotFoundError(f"{self.dir} is not a distlab run folder (no config.json)")
        self._job = None  # set by launch() while ranks run this run
        self._results: list | None = None

    def __repr__(self) -> str:
        return f"<Run {self.dir.name} world_size={self.world_size} status={self.status}>"

    @property
    def config(self) -> dict:
        return json.loads((self.dir / "config.json").read_text())

    @property
    def world_size(self) -> int:
        return self.config["world_size"]

    @property
    def status(self) -> str:
        """running, ok, failed, timeout, interrupted or stopped. A run whose launching process is gone
        while its folder still says running (the kernel was killed) is interrupted."""
        config = self.config
        if config["status"] == "running" and not _alive(config.get("launcher_pid"), config.get("host")):
            return "interrupted"
        return config["status"]

    @property
    def results(self) -> list:
        """What each rank returned, indexed by rank."""
        if self._results is None:
            if self.status == "running":
                raise RuntimeError("the run is still going: call run.wait() first")
            files = [rank_file(self.dir, "results", r) for r in range(self.world_size)]
            if not all(f.exists() for f in files):
                raise RuntimeError(f"run ended '{self.status}': no results (see run.failure / run.logs())")
            self._results = [cloudpickle.loads(f.read_bytes()) for f in files]
        return self._results

    @property
    def metrics(self):
        """A pandas DataFrame: one row per ctx.log call, with columns rank, t, step, ... (sorted by time)."""
        return self._frame("metrics")

    @property
    def comm(self):
        """A pandas DataFrame: one row per communication op: rank, t, op, tag, bytes, seconds."""
        return self._frame("comm")

    def _frame(self, kind: str):
        import pandas as pd

        rows = _read_jsonl(sorted((self.dir / kind).glob("rank*.jsonl")))
        frame = pd.DataFrame(rows)
        return frame.sort_values(["t", "rank"], ignore_index=True) if rows else frame

    def logs(self, rank: int | None = None) -> str:
        """The stdout/stderr of one rank, or of all ranks one after another."""
        ranks = range(self.world_size) if rank is None else [rank]
        paths = [rank_file(self.dir, "logs", r) for r in ranks]
        return "".join(p.read_text() for p in paths if p.exists())

    @property
    def failure(self) -> str | None:
        path = self.dir / "failure.txt"
        return path.read_text() if path.exists() else None

    @property
    def total_steps(self) -> int | None:
        path = self.dir / "progress.json"
        return json.loads(path.read_text())["total_steps"] if path.exists() else None

    def wait(self) -> Run:
        """Block until the ranks finish; raises what a blocking launch would have raised."""
        if self._job is not None:
            self._job.wait()
        return self

    def stop(self) -> None:
        """Stop a running launch now; its ranks are ended (the next launch starts new ones)."""
        if self._job is not None:
            self._job.stop()

    def figure(self):
        """The training dashboard as a static plotly figure (loss, gradient norms, drift, bytes)."""
        from .viz.figures import training_figure

        return training_figure(self)


def _alive(pid: int | None, host: str | None) -> bool:
    """Is the process that launched a run still there? (Unknown, or on another machine: assume so.)"""
    if pid is None or host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_run(path: str | os.PathLike) -> Run:
    """Reopen a run folder, finished or not: results, metrics, logs and figures as when it ran."""
    return Run(path)
