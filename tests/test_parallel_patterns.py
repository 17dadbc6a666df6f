"""Data, model and hybrid parallelism reproduce the single-process model; their bytes match the analytic counts."""

import pytest
import torch
from torch import nn

import distlab as dl
from distlab.parallel.data_parallel import (
    AVERAGING,
    SIZES,
    Spans,
    average_bucket,
    digits_train,
    n_params,
    shard_batches,
    train_data_parallel,
    train_single_process,
)
from distlab.parallel.grid import GRIDS, train_hybrid
from distlab.parallel.model_parallel import split_layers, train_model_parallel
from distlab.viz.timeline import bytes_figure, bytes_per_step, timeline_figure

STEPS = 8
WIDTH = SIZES[1]  # the activations cut between the stages of the split MLP
STAGE_PARAMS = (n_params(SIZES[:2]), n_params(SIZES[1:]))  # Linear(64,64) | Linear(64,64), Linear(64,10)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return torch.allclose(a, b, rtol=0, atol=atol)


def test_rank_batches_together_are_the_single_process_batch_across_epochs():
    x = torch.arange(1438)  # the size of digits' training part: 1438 / 32 is not whole
    ranks = [shard_batches(x, x, rank, 4, 8) for rank in range(4)]
    single = shard_batches(x, x, 0, 1, 32)
    for _ in range(100):  # 44 steps per epoch: crosses two epoch boundaries
        together = torch.cat([next(batches)[0] for batches in ranks])
        assert sorted(together.tolist()) == sorted(next(single)[0].tolist())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("averaging", AVERAGING)
def test_data_parallel_equals_one_process_with_n_times_the_batch(averaging):
    """4 ranks with batch 8 each take the steps of one process with batch 32: same gradients, same parameters."""
    reference = train_single_process(steps=STEPS, batch=32)
    run = dl.launch(train_data_parallel, world_size=4, timeout=100, averaging=averaging, steps=STEPS, batch=8)
    for result in run.results:
        assert close(result["grads"], reference["grads"], atol=1e-6)
        assert close(result["params"], reference["params"])
    assert all(torch.equal(r["params"], run.results[0]["params"]) for r in run.results)  # replicas identical
    mean_loss = torch.tensor([r["losses"] for r in run.results]).mean(0)
    assert close(mean_loss, torch.tensor(reference["losses"]))  # the mean of equal shards' means
    payload = 4 * n_params()  # every float32 gradient, each step, on each rank
    assert bytes_per_step(run.results).tolist() == [payload] * 4
    all_reduces = [s for s in run.results[0]["spans"] if s["name"] == "all_reduce"]
    assert len(all_reduces) == STEPS * {"per_parameter": 2 * (len(SIZES) - 1), "bucket": 1, "ddp": 1}[averaging]
    if averaging != "ddp":  # the hand-written ones go through ctx.comm: the run's comm table agrees
        assert run.comm.groupby("rank")["bytes"].sum().tolist() == [STEPS * payload] * 4


def test_without_averaging_the_replicas_would_differ():
    """The control for the test above: the ranks' shards alone give other gradients than the whole batch."""
    reference = train_single_process(steps=1, batch=32)
    alone = train_single_process(steps=1, batch=8)  # rank 0's batch is not the first 8 of these 32...
    assert not close(alone["grads"], reference["grads"], atol=1e-3)
    spans, model = Spans(), nn.Linear(3, 2)  # ...and averaging is a division of the sum
    for p in model.parameters():
        p.grad = torch.full_like(p, 6.0)
    average_bucket(list(model.parameters()), lambda t: t.mul_(3), 3, spans)  # a fake 3-rank all-reduce: sum = 3 x
    assert all((p.grad == 6.0).all() for p in model.parameters())
    assert [s["bytes"] for s in spans.rows] == [4 * (3 * 2 + 2)]


def test_split_layers_composes_back_to_the_model():
    torch.manual_seed(0)
    model = dl.models.mlp(*SIZES)
    x = digits_train()[0][:5]
    for stages in (1, 2, 3):
        pieces = split_layers(model, stages)
        assert len(pieces) == stages and torch.equal(nn.Sequential(*pieces)(x), model(x))
    assert [sum(p.numel() for p in piece.parameters()) for piece in split_layers(model, 2)] == list(STAGE_PARAMS)
    with pytest.raises(ValueError, match="stages must be between 1 and the model's 3 Linear layers"):
        split_layers(model, 4)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("grid", GRIDS)
def test_hybrid_2x2_equals_the_single_process_model(grid):
    """Rows (0,1) and (2,3) are two replicas of the split model; each trains on half of a batch of 32."""
    reference = train_single_process(steps=STEPS, batch=32)
    run = dl.launch(train_hybrid, world_size=4, timeout=100, grid=grid, dp=2, steps=STEPS, batch=16)
    r = run.results
    for stage0, stage1 in ((r[0], r[1]), (r[2], r[3])):
        assert close(torch.cat([stage0["grads"], stage1["grads"]]), reference["grads"], atol=1e-6)
        assert close(torch.cat([stage0["params"], stage1["params"]]), reference["params"])
    mean_loss = (torch.tensor(r[1]["losses"]) + torch.tensor(r[3]["losses"])) / 2
    assert close(mean_loss, torch.tensor(reference["losses"]))
    activations = 16 * WIDTH * 4
    expected = [4 * STAGE_PARAMS[rank % 2] + activations for rank in range(4)]  # the stage's gradients + one send
    assert bytes_per_step(r).tolist() == expected


@pytest.mark.timeout(120)
def test_model_parallel_has_the_loss_curve_of_the_unsplit_model():
    reference = train_single_process(steps=STEPS, batch=32)
    run = dl.launch(train_model_parallel, world_size=2, timeout=100, steps=STEPS, batch=32)
    first, last = run.results
    assert first["losses"] == [] and close(torch.tensor(last["losses"]), torch.tensor(reference["losses"]))
    assert close(torch.cat([first["grads"], last["grads"]]), reference["grads"], atol=1e-6)
    assert close(torch.cat([first["params"], last["params"]]), reference["params"])
    activations = 32 * WIDTH * 4  # batch x width float32, forward; its gradient, the same size, backward
    sent = run.comm.pivot_table(index="rank", columns="op", values="bytes", aggfunc="sum")
    assert sent.to_dict() == {"send": {0: STEPS * activations, 1: STEPS * activations},
                              "recv": {0: STEPS * activations, 1: STEPS * activations}}
    assert bytes_per_step(run.results).tolist() == [activations] * 2


def test_model_parallel_stages_wait_for_each_other():
    """The idle time the timeline shows: stage 1 computes only after stage 0's forward has ended."""
    run = dl.launch(train_model_parallel, world_size=2, timeout=60, steps=3, batch=32)
    spans = {(r, s["step"], s["name"]): s for r, result in enumerate(run.results) for s in result["spans"]
             if s["kind"] == "compute"}
    for step in range(3):
        assert spans[(0, step, "forward")]["end"] < spans[(1, step, "forward")]["start"]
        assert spans[(1, step, "backward")]["end"] < spans[(0, step, "backward")]["start"]


def test_bad_choices_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"averaging must be one of \('per_parameter', 'bucket', 'ddp'\)"):
        train_data_parallel(None, averaging="ring")
    with pytest.raises(ValueError, match="grid must be one of"):
        train_hybrid(None, grid="torus")


def test_timeline_draws_a_compute_and_a_comm_lane_per_rank_with_every_span():
    def spans(offset):
        rows = Spans()
        for step in range(5):
            rows.step = step
            rows.add("compute", "forward", offset + step, offset + step + 0.4)
            rows.add("comm", "all_reduce", offset + step + 0.5, offset + step + 0.9, 400)
        return {"spans": rows.rows}

    results = [spans(100.0), spans(100.1)]
    fig = timeline_figure(results, "test", last_steps=2)
    bars = {trace.name: trace for trace in fig.data}
    assert set(bars) == {"forward", "all_reduce"} and all(len(bar.x) == 4 for bar in bars.values())  # 2 steps x 2 ranks
    assert set(bars["all_reduce"].y) == {"rank 0 · comm", "rank 1 · comm"}
    assert min(bars["forward"].base) == 0 and max(bars["all_reduce"].x) == pytest.approx(400)  # ms
    assert fig.layout.title.text == "test" and fig.layout.xaxis.title.text == "time (ms)"
    totals = bytes_figure({"a": results, "b": results[:1]})
    assert [list(bar.y) for bar in totals.data] == [[400, 400], [400, 0]]  # per rank, per pattern


def test_the_grid_and_the_split_refuse_impossible_world_sizes_before_launching(tmp_path):
    with pytest.raises(dl.WorldSizeError, match=r"train_hybrid cannot run on 3 rank\(s\).* runs on: 2, 4, 6\."):
        dl.launch(train_hybrid, world_size=3, dp=2, runs_root=str(tmp_path))
    with pytest.raises(dl.WorldSizeError, match=r"train_model_parallel cannot run on 4 rank\(s\).* runs on: 1, 2, 3\."):
        dl.launch(train_model_parallel, world_size=4, runs_root=str(tmp_path))
    assert not any(tmp_path.iterdir()), "a refused launch starts nothing"


@pytest.mark.timeout(120)
def test_model_parallel_on_three_stages_matches_the_unsplit_model_and_the_middle_sends_twice():
    reference = train_single_process(steps=4, batch=32)
    run = dl.launch(train_model_parallel, world_size=3, timeout=100, steps=4, batch=32)
    assert close(torch.tensor(run.results[-1]["losses"]), torch.tensor(reference["losses"]))
    assert close(torch.cat([r["params"] for r in run.results]), reference["params"])
    activations = 32 * WIDTH * 4
    assert bytes_per_step(run.results).tolist() == [activations, 2 * activations, activations]
