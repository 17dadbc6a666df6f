"""dl.launch: run a function on N real processes from a notebook cell and get its results back.

A launch is a job: the function, cloudpickled, sent to warm ranks (ranks.py) that stay alive between
launches of the same shape. The job waits for every rank's reply while it prints their output and
refreshes the dashboard; on any failure, timeout or interrupt it kills the ranks, so the next launch
starts clean. worker.py is the rank's side.
"""

from __future__ import annotations

import atexit
import inspect
import io
import linecache
import os
import queue
import socket
import sys
import threading
import time
import types
from collections import ChainMap
from collections.abc import Callable
from multiprocessing.connection import wait as wait_any

import cloudpickle
import torch

from .ranks import Failed, Job, PoolShape, RankPool, check_world_size, default_threads, gloo_reason, place
from .runs import Run, append_lines, new_run_dir, rank_file, write_config, write_failure

START_TIMEOUT = float(os.environ.get("DISTLAB_START_TIMEOUT", "300"))  # cold start: python + import torch
FAILURE_GRACE = 0.5  # after a first failure, how long to collect other ranks' reports before choosing the root
POLL = 0.05
PUMP_LIMIT = 500  # output lines handled per loop turn, so timeouts and stop() are seen whatever ranks print
SHOWN_PER_SECOND = 200  # lines per rank printed under a cell (more freezes the browser); all go to the log
LOG_LIMIT = 10 * 2**20  # bytes of output kept per rank in logs/rank<r>.log


class RankFailure(RuntimeError):
    """A rank raised or died. `rank` is the root cause: the first to fail, not a peer whose collective broke."""

    def __init__(self, rank: int, details: str, run: Run):
        self.rank, self.traceback, self.run = rank, details, run
        super().__init__(f"rank {rank} failed; the other ranks were stopped. Rank {rank}:\n\n{details}")


class LaunchTimeout(TimeoutError):
    """The ranks did not finish within `timeout=` seconds; they were stopped. `stacks[rank]` is where
    each rank's threads were at that moment (faulthandler's text, most recent call first)."""

    def __init__(self, message: str, run: Run, stacks: dict[int, str] | None = None):
        self.run, self.stacks = run, stacks or {}
        waiting = "".join(f"\n  rank {r}: {where_waiting(text)}" for r, text in sorted(self.stacks.items()))
        super().__init__(message + (f"\nWhere each rank was waiting:{waiting}" if waiting else ""))


class _Stopped(Exception):
    pass


_pool: RankPool | None = None
_active: _Job | None = None
_lock = threading.Lock()


def shutdown() -> None:
    """Stop the warm ranks (a running non-blocking launch is stopped first). The next launch starts new ones."""
    global _pool, _active
    if _active is not None:
        _active.stop()
        _active = None
    with _lock:
        if _pool is not None:
            _pool.close()
            _pool = None


atexit.register(shutdown)


def _discard_pool() -> None:
    global _pool
    with _lock:
        if _pool is not None:
            _pool.kill()
            _pool = None


class _Job:
    """One launch: start or reuse ranks, send the function, gather replies, stream output, end cleanly."""

    def __init__(self, run: Run, shape: PoolShape, payload: bytes, timeout: float | None, fresh: bool, monitor,
                 restarts: int = 0, quiet: bool = False):
        self.run, self.shape, self.payload, self.quiet = run, shape, payload, quiet
        self.timeout, self.fresh, self.monitor, self.restarts = timeout, fresh, monitor, restarts
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._logs, self._logged, self._shown = {}, {}, {}  # per rank: log file, bytes kept, print budget
        self._hidden: dict[int, int] = {}  # lines per rank not printed since the last note
        self._noted = 0.0
        self._pool: RankPool | None = None
        self._ends = 0  # JOB_END markers seen

    # -- the two ways to run it -------------------------------------------------------------
    def drive(self) -> None:
        global _active
        started = time.time()
        try:
            for attempt in range(self.restarts + 1):
                try:
                    self._attempt(attempt)
                    break
                except RankFailure as failure:
                    if attempt == self.restarts:
                        write_failure(self.run.dir, failure.rank, failure.traceback)
                        write_config(self.run.dir, failed_rank=failure.rank)
                        raise
                    self._note_restart(attempt, failure)
            _cleanly("record the run's status", self._finish, "ok", started)
        except BaseException as error:
            _cleanly("record the run's status", self._finish, _status_of(error), started)
            raise
        finally:
            for log in self._logs.values():
                _cleanly("close a rank's log", log.close)
            if self.monitor is not None:
                _cleanly("close the live view", self.monitor.close, self.run)
            _active = None

    def start_background(self) -> None:
        def target():
            try:
                self.drive()
            except BaseException as error:
                self._error = error

        self._thread = threading.Thread(target=target, name=f"distlab {self.run.dir.name}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            while self._thread.is_alive():
                self._thread.join(0.1)  # short joins keep Kernel → Interrupt working
            if self._error is not None and not isinstance(self._error, _Stopped):
                raise self._error

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(15)

    # -- steps ------------------------------------------------------------------------------
    def _attempt(self, attempt: int) -> None:
        """Run the function once on every rank; on any failure the ranks are killed (fresh ones next time)."""
        self._ends = 0
        try:
            pool = self._acquire_pool()
            self._dispatch(pool, attempt)
            self._collect(pool)
        except BaseException:
            _discard_pool()
            if self._pool is not None:
                self._pump(self._pool)  # the readers are joined: this is the ranks' last output
            raise

    def _note_restart(self, attempt: int, failure: RankFailure) -> None:
        restarts = self.run.config.get("restarts", []) + [{"attempt": attempt, "failed_rank": failure.rank}]
        write_config(self.run.dir, restarts=restarts)
        print(f"distlab: rank {failure.rank} failed ({_headline(failure.traceback)}); "
              f"restart {attempt + 1} of {self.restarts} on new ranks, with ctx.attempt = {attempt + 1}",
              file=sys.stderr, flush=True)

    def _acquire_pool(self) -> RankPool:
        global _pool
        with _lock:
            if _pool is not None and (self.fresh or _pool.shape != self.shape or not _pool.alive()):
                _pool.close()
                _pool = None
            if _pool is not None:
                self._pool = _pool
                return _pool
            if not self.quiet:
                print(f"distlab: starting {self.shape.world_size} ranks (python + import torch)...", flush=True)
            _pool = RankPool(self.shape)
            self._pool = _pool
        self._await_ready(self._pool)
        return self._pool

    def _await_ready(self, pool: RankPool) -> None:
        pending = set(range(pool.world_size))
        deadline = time.monotonic() + START_TIMEOUT
        while pending:
            self._check_stop()
            for conn in wait_any([pool.reports[r] for r in pending], POLL):
                rank = pool.reports.index(conn)
                try:
                    conn.recv()
                    pending.discard(rank)
                except (EOFError, OSError):
                    raise RankFailure(rank, "it failed to start: " + pool.exit_description(rank), self.run) from None
            for rank in list(pending):
                if pool.procs[rank].poll() is not None:
                    raise RankFailure(rank, "it failed to start: " + pool.exit_description(rank), self.run)
            self._pump(pool)
            if time.monotonic() > deadline:
                raise LaunchTimeout(f"ranks {sorted(pending)} did not start within {START_TIMEOUT:.0f}s", self.run)

    def _dispatch(self, pool: RankPool, attempt: int) -> None:
        job = Job(self.payload, str(self.run.dir), _interactive_sources(), attempt, _users_modules())
        for conn in pool.commands:
            conn.send(job)

    def _collect(self, pool: RankPool) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        pending, failures, first_failure = set(range(pool.world_size)), [], None
        while pending:
            self._check_stop()
            for conn in wait_any([pool.reports[r] for r in pending], POLL):
                rank = pool.reports.index(conn)
                pending.discard(rank)
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    failures.append(Failed(rank, time.time(), pool.exit_description(rank), symptom=False))
                    continue
                if isinstance(reply, Failed):
                    failures.append(reply)
            for rank in [r for r in pending if pool.procs[r].poll() is not None]:
                pending.discard(rank)
                failures.append(Failed(rank, time.time(), pool.exit_description(rank), symptom=False))
            self._pump(pool)
            if failures:
                first_failure = first_failure or time.monotonic()
                if not pending or time.monotonic() - first_failure > FAILURE_GRACE:
                    root = min(failures, key=lambda f: (f.symptom, f.at))
                    raise RankFailure(root.rank, root.details, self.run)
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchTimeout(
                    f"rank(s) {sorted(pending)} still running after timeout={self.timeout}s; all ranks were "
                    f"stopped. Their output so far is in run.logs() ({self.run.dir}).", self.run,
                    self._stacks(pool, sorted(pending)))
        self._drain_job_output(pool)

    def _stacks(self, pool: RankPool, ranks: list[int], limit: float = 2.0) -> dict[int, str]:
        """Each hanging rank's Python stacks, written by the rank itself on request (worker.py)."""
        pool.request_stacks(ranks)
        files = {r: rank_file(self.run.dir, "stacks", r) for r in ranks}
        deadline, sizes = time.monotonic() + limit, None
        while time.monotonic() < deadline:
            time.sleep(POLL)
            now = {r: path.stat().st_size if path.exists() else 0 for r, path in files.items()}
            if all(now.values()) and now == sizes:  # every rank wrote, and nothing more since
                break
            sizes = now
        return {r: path.read_text() for r, path in files.items() if path.exists() and path.stat().st_size}

    def _drain_job_output(self, pool: RankPool, limit: float = 5.0) -> None:
        """Each rank writes JOB_END on stdout and stderr after its job: wait for all of them."""
        deadline = time.monotonic() + limit
        while self._ends < 2 * pool.world_size and time.monotonic() < deadline:
            self._pump(pool, wait=POLL)

    def _check_stop(self) -> None:
        if self._stopping.is_set():
            raise _Stopped("stopped by run.stop()")

    def _pump(self, pool: RankPool, wait: float = 0.0) -> None:
        """Print the ranks' new output lines with their rank, append them to the run's logs, refresh the monitor."""
        try:
            item = pool.output.get(timeout=wait) if wait else pool.output.get_nowait()
            for _ in range(PUMP_LIMIT):
                self._emit(*item)
                item = pool.output.get_nowait()
            self._emit(*item)
        except queue.Empty:
            pass
        self._note_hidden(pool)
        if self.monitor is not None:
            self.monitor.update(self.run)

    def _emit(self, rank: int, stream: str, line: str | None) -> None:
        if line is None:
            self._ends += 1
            return
        self._log(rank, line)
        if self._may_show(rank):
            print(f"[rank {rank}] {line}", file=sys.stdout if stream == "stdout" else sys.stderr, flush=True)
        else:
            self._hidden[rank] = self._hidden.get(rank, 0) + 1

    def _log(self, rank: int, line: str) -> None:
        if rank not in self._logs:
            self._logs[rank], self._logged[rank] = append_lines(self.run.dir, "logs", rank), 0
        if self._logged[rank] < LOG_LIMIT:
            self._logs[rank].write(f"{line}\n")
            self._logged[rank] += len(line) + 1
            if self._logged[rank] >= LOG_LIMIT:
                self._logs[rank].write(f"distlab: the log of rank {rank} stops here, at {LOG_LIMIT >> 20} MB\n")

    def _may_show(self, rank: int) -> bool:
        """A token bucket per rank: SHOWN_PER_SECOND lines a second, bursts up to that many."""
        now = time.monotonic()
        tokens, last = self._shown.get(rank, (SHOWN_PER_SECOND, now))
        tokens = min(SHOWN_PER_SECOND, tokens + (now - last) * SHOWN_PER_SECOND)
        self._shown[rank] = (tokens - 1, now) if tokens >= 1 else (tokens, now)
        return tokens >= 1

    def _note_hidden(self, pool: RankPool, every: float = 1.0) -> None:
        """Once a second at most: how many lines each rank printed that were not shown (or not even queued)."""
        now = time.monotonic()
        if now - self._noted < every:
            return
        self._noted = now
        for rank in range(pool.world_size):
            hidden, dropped = self._hidden.pop(rank, 0), pool.dropped[rank]
            pool.dropped[rank] = 0
            if hidden or dropped:
                kept = f"{hidden} kept in run.logs({rank})" if hidden else ""
                lost = f"{dropped} dropped while the launcher caught up" if dropped else ""
                print(f"[rank {rank}] distlab: {hidden + dropped} lines not shown (printing faster than "
                      f"{SHOWN_PER_SECOND}/s): {'; '.join(x for x in (kept, lost) if x)}", file=sys.stderr,
                      flush=True)

    def _finish(self, status: str, started: float) -> None:
        write_config(self.run.dir, status=status, seconds=round(time.time() - started, 3))


def _cleanly(what: str, step: Callable, *args) -> None:
    """Cleanup that must not wedge the launcher or hide the error being raised: a failure is only reported."""
    try:
        step(*args)
    except Exception as error:
        print(f"distlab: could not {what}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


def where_waiting(stacks: str) -> str:
    """From a faulthandler dump, the thread that runs the job: the call it is blocked in and the line of
    the user's code that made it, e.g. `recv (comm.py:65), called from ring (cell line 7)`."""
    threads = [t for t in stacks.split("\n\n") if "in run_job" in t] or [stacks]
    frames = [_frame(line.strip()) for line in threads[0].splitlines() if line.strip().startswith("File ")]
    user = next((i for i, (path, _, _) in enumerate(frames) if _is_users(path)), None)
    if user is None:
        return ", called from ".join(_named(f) for f in frames[:2]) or "(no Python frame)"
    inner = [f for f in frames[:user] if not _is_library(f[0])] or frames[:user]
    return ", called from ".join(_named(f) for f in [*inner[-1:], frames[user]])


def _frame(line: str) -> tuple[str, str, str]:
    # 'File "/x/distlab/comm.py", line 71 in recv' -> ("/x/distlab/comm.py", "71", "recv")
    path, _, rest = line[len('File "'):].partition('", line ')
    number, _, function = rest.partition(" in ")
    return path, number, function


def _named(frame: tuple[str, str, str]) -> str:
    path, number, function = frame
    return f"{function} ({os.path.basename(path)}:{number})"


def _is_library(path: str) -> bool:
    """Python's own modules and installed packages (torch, ...), where a student's code never is."""
    return path.startswith(("<", sys.base_prefix, sys.prefix)) or "site-packages" in path


def _is_users(path: str) -> bool:
    return not _is_library(path) and not path.startswith(os.path.dirname(__file__))


def _headline(details: str) -> str:
    """The one line that says what happened: an exception's last line, or how a process died."""
    lines = details.strip().splitlines() or ["?"]
    return lines[-1] if lines[0].startswith("Traceback") else lines[0].partition(". ")[0]


def _status_of(error: BaseException) -> str:
    if isinstance(error, RankFailure):
        return "failed"
    if isinstance(error, LaunchTimeout):
        return "timeout"
    if isinstance(error, _Stopped):
        return "stopped"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return "failed"


def _interactive_sources() -> dict[str, list[str]]:
    """The text of code that lives in no file (notebook cells), so ranks' tracebacks can show it."""
    return {
        name: entry[2]
        for name, entry in list(linecache.cache.items())
        if len(entry) == 4 and entry[1] is None and not os.path.exists(name)
    }


def _users_modules() -> dict[str, tuple[int, int]]:
    """The modules imported from the user's own files (not Python's, not installed packages, not distlab),
    each with its file's (mtime_ns, size): a warm rank reloads one whose file changed (worker.py)."""
    here, stamps = os.path.dirname(__file__), {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name == "__main__" or not path or not path.endswith(".py") or _is_library(path) or path.startswith(here):
            continue  # a script's own functions travel by value (cloudpickle): nothing to reload
        try:
            status = os.stat(path)
        except OSError:
            continue
        stamps[name] = (status.st_mtime_ns, status.st_size)
    return stamps


def _code_keeping_filename(code: types.CodeType):
    rebuild, args = cloudpickle.cloudpickle._code_reduce(code)
    return rebuild, tuple(code.co_filename if arg == "<dynamic-code>" else arg for arg in args)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle names every shipped code object's file "<dynamic-code>"; keep the real name so a
    rank's traceback points at the notebook cell (whose text _interactive_sources ships)."""

    dispatch_table = ChainMap({types.CodeType: _code_keeping_filename}, cloudpickle.Pickler.dispatch_table)


def _pickle(fn: Callable, kwargs: dict) -> bytes:
    try:
        buffer = io.BytesIO()
        _Pickler(buffer).dump((fn, kwargs))
        return buffer.getvalue()
    except Exception as error:
        raise TypeError(
            f"cannot send {getattr(fn, '__name__', fn)!r} and its arguments to the ranks: {error}. "
            "Functions, closures, lambdas and classes defined in cells travel fine; open files, locks, "
            "sockets, generators and live processes do not: create those inside the function."
        ) from error


def max_ranks() -> int:
    """The most ranks a launch starts without being told to: 4 per core, at least 16 ($DISTLAB_MAX_RANKS)."""
    return int(os.environ.get("DISTLAB_MAX_RANKS") or max(16, 4 * len(os.sched_getaffinity(0))))


def _check_arguments(fn: Callable, world_size: int, timeout, restarts, oversubscribe: bool, kwargs: dict) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be a function taking ctx first, got {type(fn).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if world_size > max_ranks() and not oversubscribe:
        raise ValueError(
            f"world_size={world_size} would start {world_size} Python processes, each importing torch, on "
            f"{len(os.sched_getaffinity(0))} core(s); the limit here is {max_ranks()}. If you mean it, pass "
            "oversubscribe=True (or set DISTLAB_MAX_RANKS).")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise ValueError(f"restarts must be an integer >= 0, got {restarts!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be None or a number of seconds > 0, got {timeout!r}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, **kwargs)
    except TypeError as error:
        raise TypeError(f"{fn.__name__}{signature} cannot be called with ctx, **{kwargs!r}: {error}") from None


def launch(fn: Callable, world_size: int, *, backend: str = "auto", timeout: float | None = None,
           live=False, block: bool = True, fresh: bool = False, threads: int | None = None,
           name: str | None = None, runs_root: str | None = None, restarts: int = 0, quiet: bool = False,
           oversubscribe: bool = False, **kwargs) -> Run:
    """Run `fn(ctx, **kwargs)` on `world_size` ranks; returns the Run (results, metrics, dir).

    backend: "auto" (NCCL when each rank has its own GPU, gloo otherwise), "gloo" or "nccl". A function
        marked `@ranks.needs_gloo(why)` (the parameter server, RPC) gets gloo, over CUDA tensors on GPUs.
    timeout: seconds the job may take before `LaunchTimeout` (start-up not counted).
    live: True for the live dashboard (figures + progress bar), or an object with update(run)/close(run).
    block: False returns at once; then run.wait(), run.stop(), run.status.
    fresh: start new rank processes instead of reusing warm ones.
    threads: torch threads per rank (default: cores / world_size, at least 1).
    restarts: after a rank fails, run the function again on new ranks up to this many times, in the
        same run folder; `ctx.attempt` counts the tries, so the function can resume from a checkpoint.
    quiet: no "distlab: ..." status lines (the ranks' own output still shows).
    oversubscribe: allow more ranks than max_ranks() (4 per core, at least 16).
    """
    global _active
    _check_arguments(fn, world_size, timeout, restarts, oversubscribe, kwargs)
    check_world_size(fn, world_size, kwargs)
    placement = place(world_size, backend, gloo_reason(fn))
    payload = _pickle(fn, kwargs)
    threads = threads or default_threads(world_size)
    if _active is not None:
        raise RuntimeError("a non-blocking launch is still running: run.wait() or run.stop() it first")
    name = name or getattr(fn, "__name__", "run").strip("<>")
    run_dir = new_run_dir(name, runs_root)
    write_config(
        run_dir, name=name, function=f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', name)}",
        kwargs={k: repr(v) for k, v in kwargs.items()}, world_size=world_size, backend=placement.backend,
        devices=list(placement.devices), placement=placement.summary, threads=threads,
        torch=torch.__version__, host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
        status="running", launcher_pid=os.getpid(),
    )
    run = Run(run_dir)
    if not quiet:
        print(f"distlab: {world_size} rank(s) · {placement.summary} · {threads} torch thread(s) each · "
              f"run folder {run_dir}", flush=True)
    monitor = _monitor(live)
    job = _Job(run, PoolShape(world_size, placement, threads), payload, timeout, fresh, monitor, restarts, quiet)
    run._job = job
    _active = job
    if block:
        job.drive()
    else:
        job.start_background()
    return run


def _monitor(live):
    if live is True:
        from .viz.live import Dashboard  # the one place the core reaches up: only when asked to

        return Dashboard()
    return live or None
