"""What a classroom server does to a launcher: partial lines, floods, failing cleanup, half-started pools,
typos in world_size, forks, segfaults, unpicklable results, edited modules, state left by a launch."""

import importlib
import os
import sys
import time

import psutil
import pytest
import torch

import distlab as dl
from conftest import rank_processes
from distlab import ranks


def partial_line(ctx):
    sys.stdout.write("no newline at the end")  # tqdm(leave=False) and friends do this


def test_a_partial_last_line_neither_delays_the_next_launch_nor_leaks_the_marker(capfd):
    dl.launch(partial_line, world_size=2)
    started = time.monotonic()
    dl.launch(partial_line, world_size=2)
    assert time.monotonic() - started < 0.5
    out = capfd.readouterr().out
    assert "[rank 0] no newline at the end" in out and "\x00" not in out


def flood(ctx):
    while True:
        print("x" * 60)


def test_a_flooding_rank_still_times_out_on_time_with_the_launcher_memory_bounded(capfd, no_ranks_left):
    dl.launch(lambda ctx: None, world_size=2)
    rss = psutil.Process().memory_info().rss
    started = time.monotonic()
    with pytest.raises(dl.LaunchTimeout):
        dl.launch(flood, world_size=2, timeout=5)
    assert time.monotonic() - started < 10
    assert psutil.Process().memory_info().rss - rss < 300 * 2**20
    err = capfd.readouterr().err
    assert "lines not shown (printing faster than" in err


class BrokenView:
    """A live= object whose close() raises (a full disk, a dashboard bug)."""

    def update(self, run):
        pass

    def close(self, run):
        raise OSError("No space left on device")


def test_a_failing_cleanup_frees_the_launcher_and_keeps_the_original_error(capfd):
    assert dl.launch(lambda ctx: ctx.rank, world_size=2, live=BrokenView()).results == [0, 1]
    assert "could not close the live view: OSError: No space left on device" in capfd.readouterr().err
    with pytest.raises(dl.RankFailure, match="ZeroDivisionError"):
        dl.launch(lambda ctx: 1 / 0, world_size=2, live=BrokenView())
    assert dl.launch(lambda ctx: ctx.rank, world_size=2).results == [0, 1]


def test_a_pool_that_fails_to_start_rank_k_ends_the_ranks_already_started(monkeypatch):
    dl.shutdown()
    real, started = ranks.subprocess.Popen, []

    def popen(*args, **kwargs):
        if len(started) == 2:
            raise OSError(24, "Too many open files")
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(ranks.subprocess, "Popen", popen)
    with pytest.raises(OSError, match="Too many open files"):
        dl.launch(lambda ctx: None, world_size=4)
    assert len(started) == 2 and all(p.poll() is not None for p in started)
    monkeypatch.setattr(ranks.subprocess, "Popen", real)
    assert dl.launch(lambda ctx: ctx.rank, world_size=2).results == [0, 1]


def test_a_world_size_typo_is_refused_before_anything_starts():
    before = {p.pid for p in rank_processes()}
    with pytest.raises(ValueError, match=r"world_size=400 would start 400 Python processes.*oversubscribe=True"):
        dl.launch(lambda ctx: None, world_size=400)
    assert {p.pid for p in rank_processes()} == before


def forks(ctx):
    if os.fork() == 0:
        return "child"  # returns from the function in a copy of the rank
    os.wait()
    return ctx.rank


def test_a_child_that_returns_from_the_function_does_not_confuse_the_pool():
    assert dl.launch(forks, world_size=2).results == [0, 1]
    assert dl.launch(lambda ctx: ctx.rank * 2, world_size=2).results == [0, 2]


def segfaults(ctx):
    if ctx.rank == 1:
        import ctypes

        ctypes.string_at(0)


def test_a_segfault_shows_the_python_stack(no_ranks_left):
    with pytest.raises(dl.RankFailure) as caught:
        dl.launch(segfaults, world_size=2, timeout=60)
    assert caught.value.rank == 1
    assert "SIGSEGV" in str(caught.value) and "Segmentation fault" in str(caught.value)
    assert "in segfaults" in str(caught.value)


def test_an_unpicklable_result_says_what_could_not_be_pickled(no_ranks_left):
    with pytest.raises(dl.RankFailure, match=r"the return value of rank [01] could not be pickled: generator"):
        dl.launch(lambda ctx: (i for i in range(3)), world_size=2)


def test_warm_ranks_run_an_edited_module_as_it_is_now(tmp_path, monkeypatch):
    module = tmp_path / "student_code.py"
    module.write_text("def version(ctx):\n    return 'v1'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import student_code

    assert dl.launch(student_code.version, world_size=2).results == ["v1", "v1"]
    module.write_text("def version(ctx):\n    return 'v2, edited'\n")
    importlib.reload(student_code)
    assert dl.launch(student_code.version, world_size=2).results == ["v2, edited"] * 2


def changes_state(ctx):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(ctx.world_size + 3)
    torch.manual_seed(123)
    torch.set_grad_enabled(False)


def state(ctx):
    return (torch.get_default_dtype(), torch.get_num_threads(), torch.rand(1).item(), torch.is_grad_enabled())


def test_state_one_launch_changed_does_not_leak_into_the_next():
    fresh = dl.launch(state, world_size=2, fresh=True).results
    dl.launch(changes_state, world_size=2)
    assert dl.launch(state, world_size=2).results == fresh
    assert fresh[0][0] == torch.float32 and fresh[0][3] is True
