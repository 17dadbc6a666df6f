"""Telemetry: gradient norms, drift, and the bytes that communication moves, counted per rank."""

import json
import math
import os
import signal
import time

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import distlab as dl
from distlab.telemetry import FLUSH_EVERY, GradNormMeter, Telemetry, grad_norms
from distlab.viz.figures import training_figure
from distlab.viz.live import explain_sampling, sampling_interval
from rank_fns import train_digits

MLP_PARAMS = 64 * 32 + 32 + 32 * 10 + 10  # dl.models.mlp(64, 32, 10)


def test_grad_norms_are_per_layer_l2_norms():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    norms = grad_norms(model)
    assert set(norms) == {"grad/0", "grad/2"}
    assert math.isclose(norms["grad/0"], 2.0 * math.sqrt(3 * 2 + 2), rel_tol=1e-6)  # weight and bias of layer 0
    assert math.isclose(norms["grad/2"], 2.0 * math.sqrt(2 + 1), rel_tol=1e-6)


def test_drift_is_each_rank_distance_to_the_mean_of_the_replicas():
    def fn(ctx):
        model = nn.Linear(4, 1, bias=False)  # 4 parameters, all set to the rank number
        nn.init.constant_(model.weight, float(ctx.rank))
        return ctx.drift(model)

    drifts = dl.launch(fn, world_size=4).results
    mean = 1.5
    assert [round(d, 5) for d in drifts] == [round(abs(r - mean) * 2, 5) for r in range(4)]  # sqrt(4) = 2


def test_ddp_hook_counts_every_gradient_byte_and_drift_is_counted_apart():
    """20 steps, drift every 5 on 2 ranks."""
    run = dl.launch(train_digits, world_size=2, steps=20, drift_every=5)
    assert run.results == [MLP_PARAMS] * 2
    metrics, comm = run.metrics, run.comm
    steps = metrics.dropna(subset=["step"])
    assert (steps["comm_bytes"] == 4 * MLP_PARAMS).all()  # one float32 all-reduce of all gradients per step
    # Drift of steps 0, 5, 10, 15 overlaps the next step and arrives with the next row (the last one at the end).
    with_drift = metrics.dropna(subset=["drift"])
    assert sorted(with_drift["drift_step"]) == [0, 0, 5, 5, 10, 10, 15, 15]
    assert (with_drift["overhead_bytes"] == 4 * MLP_PARAMS).all()
    assert (metrics[metrics["drift"].isna()]["overhead_bytes"] == 0).all()
    assert set(comm["tag"]) == {"ddp", "telemetry"} and (comm[comm["tag"] == "telemetry"]["seconds"] > 0).all()
    assert comm[comm["tag"] == "ddp"].groupby("rank")["bytes"].sum().tolist() == [20 * 4 * MLP_PARAMS] * 2
    layers = {c for c in metrics.columns if c.startswith("grad/")}
    assert layers == {"grad/0", "grad/2"} and (metrics[sorted(layers)] > 0).all().all()


def count_ddp_syncs(ctx):
    """Two synchronized steps, one accumulation step under no_sync, one evaluation without grad."""
    model = DDP(dl.models.mlp(64, 32, 10))
    ctx.watch(model, drift_every=0)
    x = torch.randn(8, 64)
    for _ in range(2):
        model(x).sum().backward()
    with model.no_sync():
        model(x).sum().backward()
    with torch.no_grad():
        model(x)
    ctx.log(step=0)
    return model._comm_hooks  # DDP's own C++ all-reduce: no Python hook runs per bucket


def test_ddp_bytes_count_only_the_backwards_that_synchronize():
    run = dl.launch(count_ddp_syncs, world_size=2)
    assert run.results == [[], []]
    assert (run.metrics["comm_bytes"] == 2 * 4 * MLP_PARAMS).all()


def watch_a_hooked_model(ctx):
    model = DDP(nn.Linear(2, 2))
    model.register_comm_hook(None, default_hooks.allreduce_hook)
    ctx.watch(model)


def test_a_model_with_its_own_comm_hook_is_refused_by_name():
    with pytest.raises(dl.RankFailure, match=r"already has a comm hook \(allreduce_hook\)"):
        dl.launch(watch_a_hooked_model, world_size=2)


def test_replicas_stay_together_with_ddp_and_drift_apart_without_it():
    """The claim notebook 00 teaches: no communication, no consistency."""
    synced = dl.launch(train_digits, world_size=4, steps=60, sync=True).metrics
    alone = dl.launch(train_digits, world_size=4, steps=60, sync=False).metrics
    synced_drift = synced.groupby("drift_step")["drift"].mean()
    alone_drift = alone.groupby("drift_step")["drift"].mean()
    assert synced_drift.max() < 1e-5
    assert alone_drift.iloc[-1] > 0.1 and alone_drift.is_monotonic_increasing
    assert (alone["comm_bytes"] == 0).all()


def test_comm_wrappers_record_payload_bytes_per_op():
    def fn(ctx):
        t = torch.zeros(10)  # 40 bytes
        ctx.comm.all_reduce(t)
        ctx.comm.broadcast(t, src=0)
        ctx.comm.all_gather(t)
        if ctx.rank == 0:
            ctx.comm.send(t, dst=1)
        else:
            ctx.comm.recv(t, src=0)
        ctx.comm.barrier()
        ctx.log(step=0)

    run = dl.launch(fn, world_size=2)
    per_op = run.comm[run.comm["rank"] == 1].set_index("op")["bytes"].to_dict()
    assert per_op == {"all_reduce": 40, "broadcast": 40, "all_gather": 40, "recv": 40, "barrier": 0}
    assert run.metrics.set_index("rank")["comm_bytes"].to_dict() == {0: 160, 1: 160}


# -- cheap by default: fused norms, rows written in batches, nothing lost ------------------------------

def test_fused_norms_equal_per_parameter_norms_combined_per_layer():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Linear(3, 2, bias=False))
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    model[3].weight.grad = None  # a parameter that took no part in this backward
    norms = GradNormMeter(model).measure()
    expected = {f"grad/{i}": math.sqrt(sum(p.grad.norm().item() ** 2 for p in model[i].parameters()))
                for i in (0, 2)}
    for p in model.parameters():  # the next step overwrites the gradients: the measured norms must not move
        if p.grad is not None:
            p.grad.mul_(10)
    per_layer = norms.per_layer()
    assert set(per_layer) == set(expected)
    assert all(math.isclose(per_layer[k], expected[k], rel_tol=1e-6) for k in expected)
    assert grad_norms(model).keys() == expected.keys()


def test_norms_of_gradients_made_with_create_graph_grow_no_graph():
    model = nn.Linear(3, 1)
    (model(torch.ones(2, 3)) ** 2).sum().backward(create_graph=True)  # as a gradient penalty does
    assert model.weight.grad.requires_grad
    norms = GradNormMeter(model).measure()
    assert not any(n.requires_grad for n in norms.norms)
    assert math.isclose(norms.per_layer()["grad/weight"], model.weight.grad.norm().item(), rel_tol=1e-6)


def lines(run_dir, kind="metrics"):
    path = run_dir / kind / "rank0.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_rows_wait_in_memory_and_all_reach_the_disk_on_close(tmp_path):
    recorder = Telemetry(tmp_path, 0, flush_every=600)
    for step in range(50):
        recorder.record_comm("send", 8, 0.001, "train")
        recorder.log({"step": step, "loss": torch.tensor(1.0 / (step + 1))})
    assert lines(tmp_path) == []  # buffered: nothing written per step
    recorder.close()
    rows = lines(tmp_path)
    assert [r["step"] for r in rows] == list(range(50)) and rows[3]["loss"] == 0.25
    assert len(lines(tmp_path, "comm")) == 50 and all(r["comm_bytes"] == 8 for r in rows)
    recorder.close()  # twice is harmless


def test_rows_reach_the_disk_within_the_flush_interval_while_the_rank_runs(tmp_path):
    recorder = Telemetry(tmp_path, 0, flush_every=0.1)
    recorder.log({"step": 0, "loss": float("nan")})
    deadline = time.monotonic() + 10
    while not lines(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines(tmp_path) == [{**lines(tmp_path)[0], "step": 0, "loss": "nan"}]  # written before any close
    recorder.close()


def train_sampled(ctx, steps=20, every=5):
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(dl.models.mlp(64, 32, 10))
    ctx.watch(model, drift_every=0, every=every)
    x, y, _, _ = dl.data.digits(ctx.rank, ctx.world_size)
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(x[:32]), y[:32])
        model.zero_grad()
        loss.backward()
        ctx.log(step=step, loss=loss.item())


def test_sampled_norms_come_every_k_steps_and_the_dashboard_says_so(tmp_path):
    metrics = dl.launch(train_sampled, world_size=2).metrics
    sampled = metrics.dropna(subset=["grad/0"])
    assert sorted(set(sampled["step"])) == [0, 5, 10, 15] and len(metrics) == 40
    assert (metrics["comm_bytes"] == 4 * MLP_PARAMS).all()  # the hook still counts every step's all-reduce
    assert sampling_interval(metrics) == 5
    titles = [note.text for note in explain_sampling(training_figure(metrics), metrics).layout.annotations]
    assert "gradient norm per layer (rank 0), every 5 steps (ctx.watch(model, every=5))" in titles
    ctx = dl.Context(0, 1, torch.device("cpu"), "gloo", tmp_path)
    with pytest.raises(ValueError, match="every must be a positive number of steps"):
        ctx.watch(nn.Linear(1, 1), every=0)
    ctx.close()


def log_then_fail(ctx, how):
    for step in range(5):
        ctx.log(step=step, loss=1.0)
    if ctx.rank == 1:
        if how == "raise":
            raise RuntimeError("rank 1 fails after 5 rows")
        time.sleep(3 * FLUSH_EVERY)  # longer than the flush interval, then killed outright
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # rank 0 waits to be stopped


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_loses_no_row_it_logged(how):
    with pytest.raises(dl.RankFailure) as failure:
        dl.launch(log_then_fail, world_size=2, how=how, timeout=60)
    assert failure.value.rank == 1
    metrics = dl.load_run(failure.value.run.dir).metrics
    assert sorted(metrics[metrics["rank"] == 1]["step"]) == list(range(5))

