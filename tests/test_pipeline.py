"""Pipeline parallelism: hand-written GPipe and 1F1B against the unsplit GPT, the built-in, and data x pipeline."""

import pytest
import torch

import distlab as dl
from distlab import gpt
from distlab.parallel import pipeline as pp

P, M = 4, 4


def merged_grads(results):
    grads = {}
    for r in results:
        assert not set(grads) & set(r["grads"]), "a parameter lives on two stages"
        grads.update(r["grads"])
    return grads


def assert_same_grads(grads, reference):
    assert set(grads) == set(reference)
    for name, g in reference.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def schedules():
    """One hand-written step of each schedule on 4 stages, 4 micro-batches."""
    return {name: dl.launch(pp.pipeline_train, world_size=P, timeout=120, schedule=name, micro_batches=M).results
            for name in pp.SCHEDULES}


def test_every_stage_runs_each_micro_batch_forward_then_backward_once():
    for p, m in [(4, 8), (4, 2), (2, 1)]:
        for stage in range(p):
            for name in pp.SCHEDULES:
                actions = pp.schedule_for(name, m, p, stage)
                assert sorted(actions) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
                assert all(actions.index(("F", i)) < actions.index(("B", i)) for i in range(m))


def test_simulated_ideal_pipeline_has_the_predicted_bubble_for_both_schedules():
    """Equal stages, free communication: the measurement rule gives exactly (p-1)/(m+p-1)."""
    for name in pp.SCHEDULES:
        for m in (1, 2, 4, 8):
            events = pp.simulate(name, p=4, m=m)
            assert pp.bubble_fraction(events, 4) == pytest.approx(pp.predicted_bubble(4, m), abs=1e-12)


@pytest.mark.timeout(180)
def test_gpipe_and_1f1b_give_the_unsplit_loss_and_gradients(schedules):
    losses, reference = gpt.train_single()
    for name, results in schedules.items():
        assert [r["loss"] is None for r in results] == [True] * (P - 1) + [False]
        assert results[-1]["loss"] == pytest.approx(losses[0], abs=1e-5), name
        assert_same_grads(merged_grads(results), reference)


@pytest.mark.timeout(180)
def test_1f1b_holds_at_most_p_minus_stage_micro_batches_gpipe_all_of_them(schedules):
    gpipe, one_f_one_b = schedules["gpipe"], schedules["1f1b"]
    assert [r["peak_micro"] for r in gpipe] == [M] * P
    assert [r["peak_micro"] for r in one_f_one_b] == [min(P - s, M) for s in range(P)]
    for s in range(P):  # equal micro-batches save equal bytes, so bytes scale with the count
        assert gpipe[s]["peak_bytes"] > 0
        assert one_f_one_b[s]["peak_bytes"] * M == gpipe[s]["peak_bytes"] * min(P - s, M)
        assert sorted((e["kind"], e["micro"]) for e in gpipe[s]["events"]) == sorted(
            (k, i) for k in "FB" for i in range(M))


@pytest.mark.timeout(180)
def test_torch_pipelining_gives_the_unsplit_loss_and_gradients():
    losses, reference = gpt.train_single()
    for name in pp.SCHEDULES:
        results = dl.launch(pp.builtin_pipeline, world_size=P, timeout=120, schedule=name, micro_batches=M).results
        assert results[-1]["loss"] == pytest.approx(losses[0], abs=1e-5)
        assert_same_grads(merged_grads(results), reference)


@pytest.mark.timeout(180)
def test_data_x_pipeline_on_a_2x2_mesh_trains_like_one_process():
    losses, _ = gpt.train_single(steps=3, lr=0.1)
    run = dl.launch(pp.data_pipeline, world_size=4, timeout=120, steps=3, lr=0.1)
    last_stages = [r["losses"] for r in run.results if r["stage"] == 1]  # one per data-parallel replica
    assert len(last_stages) == 2
    mean = [sum(step) / 2 for step in zip(*last_stages)]  # each replica saw half of the batch
    assert mean == pytest.approx(losses, abs=1e-5)
    assert set(run.comm["tag"]) == {"pp", "dp"}
    stage_params = {r["stage"]: sum(g.numel() for g in r["grads"].values()) for r in run.results}
    dp_bytes = run.comm[run.comm["tag"] == "dp"].groupby("rank")["bytes"].sum()
    assert [dp_bytes[r] for r in range(4)] == [3 * 4 * stage_params[run.results[r]["stage"]] for r in range(4)]


def test_bad_schedule_and_micro_batches_are_refused_by_name():
    with pytest.raises(ValueError, match="schedule"):
        pp.schedule_for("zigzag", 4, 2, 0)
    with pytest.raises(ValueError, match="micro_batches"):
        pp.split_micro(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="p=5"):
        pp.stage_bounds(4, 5)


@pytest.mark.parametrize("fn, kwargs, size, sizes", [(pp.pipeline_train, {}, 7, "1, 2, 3, 4, 5, 6"),
                                                     (pp.builtin_pipeline, {}, 7, "1, 2, 3, 4, 5, 6"),
                                                     (pp.data_pipeline, {"dp": 2, "pp": 2}, 3, "4")])
def test_more_stages_than_layers_or_a_mesh_of_another_size_is_refused_before_any_process_starts(tmp_path, fn, kwargs,
                                                                                              size, sizes):
    with pytest.raises(dl.WorldSizeError, match=rf"{fn.__name__} cannot run on {size} rank\(s\).* runs on: {sizes}\."):
        dl.launch(fn, world_size=size, runs_root=str(tmp_path), **kwargs)
    assert not any(tmp_path.iterdir())
