import os
import time

import psutil
import pytest
import torch

import distlab as dl

os.environ.setdefault("DISTLAB_AUDIT", "1")  # every rank of every test runs under the device audit (distlab/audit.py)


@pytest.fixture(autouse=True)
def runs_root(tmp_path, monkeypatch):
    """Each test's run folders go to its own temp dir."""
    root = tmp_path / "runs"
    monkeypatch.setenv("DISTLAB_RUNS", str(root))
    monkeypatch.setenv("DISTLAB_PROGRESS", str(tmp_path / "progress.jsonl"))  # labs.check records there
    return root


def rank_processes() -> list[psutil.Process]:
    """distlab ranks started by this test process (still alive)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "distlab.worker" in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def gone(pids, within: float = 5.0) -> bool:
    """True once none of pids exists (zombies count as gone), waiting at most `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one torch thread is fastest, and threads fight on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_ranks_left():
    """Assert after the test that it left no rank process behind."""
    yield
    leftover = rank_processes()
    assert not leftover, f"ranks left running: {[p.pid for p in leftover]}"


def pytest_sessionfinish(session, exitstatus):
    dl.shutdown()
    os.environ.pop("DISTLAB_RUNS", None)


def pytest_collection_modifyitems(session, config, items):
    """The site test builds the course from the notebooks the browser test just executed: run it last."""
    items.sort(key=lambda item: item.path.name == "test_site.py")
