"""run_local_nodes on a shared server: everything it starts listens on loopback only, and nothing it
starts outlives it (timeout, Ctrl-C, or the launching process killed with SIGKILL).

Processes are found two ways, as the README's no-leftover tests do: by walking the tree down from this
process, and by an environment marker searched in every process (workers may leave the agents' tree)."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from distlab import multinode

TESTS = Path(__file__).resolve().parent
MARKER = "DISTLAB_TEST_MULTINODE"  # set by the tests; every agent and worker inherits it


def hold(ctx, folder: str, seconds: float = 60.0):
    """A worker that says it is up (a file per rank), then waits until `folder/release` or `seconds`."""
    Path(folder, f"ready-{ctx.rank}").touch()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not Path(folder, "release").exists():
        time.sleep(0.05)
    return ctx.rank


@pytest.fixture
def marker(monkeypatch):
    """A fresh marker in this process's environment (so run_local_nodes passes it on), the tests folder on
    the workers' path; afterwards, kill whatever still carries the marker, so a failure leaks nothing."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, tag)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    yield tag
    for proc in marked(tag):
        proc.kill()


def marked(tag: str) -> list[psutil.Process]:
    """Every process on the machine (but this one) whose environment carries the marker `tag`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARKER) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def started(tag: str) -> list[psutil.Process]:
    """This test's processes: this process's descendants, walked recursively, plus every marked process."""
    tree = {p.pid: p for p in psutil.Process().children(recursive=True)}
    return list({**tree, **{p.pid: p for p in marked(tag)}}.values())


def none_left(tag: str, within: float) -> list[int]:
    """The marked processes still alive (not zombies) after waiting up to `within` seconds for them to end."""
    deadline = time.monotonic() + within
    while True:
        alive = [p.pid for p in marked(tag) if _alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _environ(proc: psutil.Process) -> dict:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return {}


def wait_for_ready(folder: Path, ranks: int, within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    while len(list(folder.glob("ready-*"))) < ranks:
        assert time.monotonic() < deadline, f"the workers did not start within {within} s"
        time.sleep(0.1)


def listening(procs) -> dict[str, list]:
    """{'pid cmdline': [listening inet addresses]} for the processes that listen."""
    found = {}
    for proc in procs:
        try:
            addresses = [c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            if addresses:
                found[f"{proc.pid} {' '.join(proc.cmdline())[:120]}"] = addresses
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


@pytest.mark.timeout(240)
def test_every_socket_of_the_agents_and_workers_is_on_loopback(marker, tmp_path):
    folder = tmp_path / "hold"
    folder.mkdir()
    box = {}

    def job():
        try:
            box["run"] = multinode.run_local_nodes("test_multinode:hold", nnodes=2, nproc_per_node=2,
                                                   folder=str(folder), seconds=120, runs_root=tmp_path / "runs",
                                                   timeout=200)
        except BaseException as error:  # noqa: B036 - reported by the main thread
            box["error"] = error

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    try:
        wait_for_ready(folder, 4)
        procs = started(marker)
        sockets = listening(procs)
        workers = [env for env in map(_environ, procs) if "LOCAL_RANK" in env]  # torchrun's workers
    finally:
        (folder / "release").touch()
        thread.join(timeout=120)
    assert "error" not in box, box.get("error")
    assert sorted(box["run"].results) == [0, 1, 2, 3]
    assert sockets, "nothing listening: the test looked at the wrong processes"
    beyond = {who: ips for who, ips in sockets.items() if not all(ipaddress.ip_address(ip).is_loopback for ip in ips)}
    assert not beyond, f"listening beyond loopback: {beyond}"
    print("listening:", sockets)
    assert len(workers) == 4
    assert all(env.get("GLOO_SOCKET_IFNAME") == "lo" and env.get("TP_SOCKET_IFNAME") == "lo" for env in workers)


@pytest.mark.timeout(240)
def test_a_timeout_leaves_no_agent_and_no_worker(marker, tmp_path):
    folder = tmp_path / "hold"
    folder.mkdir()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="did not finish within"):
        multinode.run_local_nodes("test_multinode:hold", nnodes=2, nproc_per_node=1, folder=str(folder), seconds=600,
                                  runs_root=tmp_path / "runs", timeout=30)
    assert len(list(folder.glob("ready-*"))) == 2, "the workers had not started: the timeout tested nothing"
    assert time.monotonic() - t0 < 30 + 10
    assert none_left(marker, within=3) == []


def _launcher(tag: str, folder: Path, tmp_path: Path) -> subprocess.Popen:
    """A separate launching process (a kernel, say) running a job that holds for 10 minutes."""
    code = ("import signal, sys; from distlab import multinode; "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "  # as in a kernel, whatever the parent ignores
            f"multinode.run_local_nodes('test_multinode:hold', nnodes=2, nproc_per_node=1, folder={str(folder)!r}, "
            f"seconds=600, runs_root={str(tmp_path / 'runs')!r}, timeout=900)")
    return subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, **{MARKER: tag}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "interrupt"])
def test_when_the_launching_process_dies_or_is_interrupted_its_nodes_end_too(marker, tmp_path, how):
    folder = tmp_path / "hold"
    folder.mkdir()
    launcher = _launcher(marker, folder, tmp_path)
    try:
        wait_for_ready(folder, 2)
        os.kill(launcher.pid, how)
        launcher.wait(timeout=15)
        assert none_left(marker, within=5) == []
    finally:
        launcher.kill()
        launcher.wait()
