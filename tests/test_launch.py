"""dl.launch: results, run folders, output, warm ranks, placement, bad input."""

import json
import os
import threading
import time

import pytest
import torch

import distlab as dl
from conftest import gone, rank_processes
from distlab import audit
from rank_fns import add


def test_closures_and_local_classes_run_on_every_rank():
    offset = 100

    class Scaler:  # defined locally: travels by value
        def __init__(self, k):
            self.k = k

    def fn(ctx, k=2):
        t = torch.tensor([float(ctx.rank)])
        torch.distributed.all_reduce(t)
        return Scaler(k).k * ctx.rank + offset, t.item(), ctx.world_size

    run = dl.launch(fn, world_size=3, k=5)
    assert [r[0] for r in run.results] == [100, 105, 110]
    assert {r[1] for r in run.results} == {3.0}  # 0 + 1 + 2 on every rank
    assert {r[2] for r in run.results} == {3}


def test_run_folder_holds_config_metrics_logs_results_and_reloads():
    def fn(ctx):
        print(f"hello from {ctx.rank}")
        for step in range(3):
            ctx.log(step=step, loss=1.0 / (step + 1 + ctx.rank))
        return {"rank": ctx.rank}

    run = dl.launch(fn, world_size=2)
    config = json.loads((run.dir / "config.json").read_text())
    assert config["status"] == "ok" and config["world_size"] == 2 and config["backend"] == "gloo"
    assert sorted(p.name for p in (run.dir / "metrics").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    assert len(run.metrics) == 6 and {"rank", "step", "loss", "comm_bytes"} <= set(run.metrics.columns)
    assert "hello from 1" in run.logs(1)

    again = dl.load_run(run.dir)
    assert again.results == [{"rank": 0}, {"rank": 1}]
    assert again.metrics.equals(run.metrics)
    assert again.status == "ok"


def test_each_line_of_output_is_prefixed_by_its_rank(capfd):
    def fn(ctx):
        import sys

        print(f"out {ctx.rank}")
        print(f"err {ctx.rank}", file=sys.stderr)

    dl.launch(fn, world_size=2)
    out, err = capfd.readouterr()
    assert "[rank 0] out 0" in out and "[rank 1] out 1" in out
    assert "[rank 0] err 0" in err and "[rank 1] err 1" in err


def test_warm_ranks_are_reused_until_fresh_or_a_new_shape():
    first = dl.launch(lambda ctx: os.getpid(), world_size=2).results
    second = dl.launch(lambda ctx: os.getpid(), world_size=2).results
    assert first == second
    fresh = dl.launch(lambda ctx: os.getpid(), world_size=2, fresh=True).results
    assert not set(fresh) & set(first)
    three = dl.launch(lambda ctx: os.getpid(), world_size=3).results
    assert len(set(three)) == 3 and not set(three) & set(fresh)
    assert sorted(p.pid for p in rank_processes()) == sorted(three)  # the old ranks are gone


def test_ranks_share_the_cores_out_as_torch_threads():
    threads = dl.launch(lambda ctx: torch.get_num_threads(), world_size=2).results
    assert threads == [max(1, len(os.sched_getaffinity(0)) // 2)] * 2
    assert dl.launch(lambda ctx: torch.get_num_threads(), world_size=2, threads=1).results == [1, 1]


def test_functions_from_modules_and_cli_style_kwargs():
    assert dl.launch(add, world_size=2, x=10).results == [10, 11]


def test_auto_backend_follows_the_placement_rule():
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    placement = dl.place(4)
    if gpus >= 4:
        assert placement.backend == "nccl" and placement.devices == ("cuda:0", "cuda:1", "cuda:2", "cuda:3")
    elif gpus:
        assert placement.backend == "gloo" and placement.devices == tuple(f"cuda:{r % gpus}" for r in range(4))
    else:
        assert placement.backend == "gloo" and placement.devices == ("cpu",) * 4
    ranks = dl.launch(lambda ctx: (ctx.backend, str(ctx.device)), world_size=2).results
    assert [backend for backend, _ in ranks] == [dl.place(2).backend] * 2
    # under the device audit a CPU job's device is spelled "cpu:0": the same device under another name
    assert all(audit.same_device(torch.device(got), torch.device(want))
               for (_, got), want in zip(ranks, dl.place(2).devices))


@pytest.mark.parametrize("kwargs, error, words", [
    ({"world_size": 0}, ValueError, "world_size must be an integer >= 1"),
    ({"world_size": "4"}, ValueError, "world_size"),
    ({"world_size": 2, "backend": "mpi"}, ValueError, "backend must be one of"),
    ({"world_size": 2, "timeout": 0}, ValueError, "timeout"),
    ({"world_size": 2, "learning_rate": 0.1}, TypeError, "learning_rate"),
])
def test_bad_input_fails_before_anything_starts(kwargs, error, words, no_ranks_left):
    dl.shutdown()
    with pytest.raises(error, match=words):
        dl.launch(add, **kwargs)
    assert not rank_processes()


def test_nccl_without_enough_gpus_says_what_to_do(no_ranks_left):
    dl.shutdown()
    too_many = torch.cuda.device_count() + 1
    with pytest.raises(ValueError, match="backend='nccl' needs one GPU per rank.*backend='auto'"):
        dl.launch(add, world_size=too_many, backend="nccl")
    assert not rank_processes()


def test_a_function_that_cannot_be_pickled_is_refused_up_front(no_ranks_left):
    dl.shutdown()
    lock = threading.Lock()
    with pytest.raises(TypeError, match="cannot send 'holds_lock'.*create those inside the function"):
        def holds_lock(ctx):
            return lock.locked()

        dl.launch(holds_lock, world_size=2)
    assert not rank_processes()


def test_non_blocking_launch_streams_metrics_and_can_be_waited_for():
    def slow(ctx, steps=30):
        for step in range(steps):
            ctx.log(step=step, loss=float(step))
            time.sleep(0.05)
        return ctx.rank

    run = dl.launch(slow, world_size=2, block=False)
    assert run.status == "running"
    with pytest.raises(RuntimeError, match="still going"):
        run.results
    deadline = time.monotonic() + 30
    while run.status == "running" and len(run.metrics) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    seen_while_running = len(run.metrics)
    assert run.wait().results == [0, 1]
    assert 0 < seen_while_running < 60 and len(run.metrics) == 60
    assert run.status == "ok"


def test_stop_ends_a_non_blocking_launch_and_its_ranks(no_ranks_left):
    def forever(ctx):
        while True:
            time.sleep(0.1)

    run = dl.launch(forever, world_size=2, block=False)
    time.sleep(1)
    pids = [p.pid for p in rank_processes()]
    assert len(pids) == 2
    run.stop()
    assert run.status == "stopped"
    assert gone(pids, within=5)  # stop() itself ended them: no shutdown() before the check
