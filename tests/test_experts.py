"""Mixture of experts: slots and capacity, the load-balancing loss, and expert parallelism on real gloo ranks
equal to the same MoE on one process (output, gradients), its all-to-all bytes against the formula."""

import pytest
import torch

import distlab as dl
from distlab import gpt
from distlab.parallel import experts as ex


def test_first_choices_fill_the_slots_before_second_choices_and_overflow_is_dropped():
    choices = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    slots = ex.assign_slots(choices, n_experts=3, capacity=2)
    # expert 0: tokens 0, 1 (first choices) fill it; token 2's first choice and token 3's second are dropped
    assert slots.tolist() == [[0, 1], [1, 0], [-1, -1], [0, -1]]
    assert ex.capacity(tokens=10, n_experts=4, top_k=2, capacity_factor=1.0) == 5


def test_the_aux_loss_is_one_when_balanced_and_larger_when_not():
    router = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 10.0]]))
    balanced = ex.route(router, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 1, 1.0)
    skewed = ex.route(router, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 1, 1.0)
    assert balanced.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert skewed.aux_loss.item() == pytest.approx(2.0, abs=1e-3) and skewed.dropped() == 1


def test_an_moe_with_room_for_every_token_and_identical_experts_is_that_mlp_scaled_by_its_gate():
    layer, x = ex.moe_setup(capacity_factor=4.0)
    for expert in layer.experts[1:]:
        expert.load_state_dict(layer.experts[0].state_dict())
    gate = layer.router(x).softmax(-1).max(-1).values[..., None]
    torch.testing.assert_close(layer(x), gate * layer.experts[0](x), atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [4, 2])
def test_expert_parallel_equals_one_process_and_sends_the_predicted_bytes(world_size):
    for moe in (dict(top_k=1, capacity_factor=1.0), dict(top_k=2, capacity_factor=0.75)):
        run = dl.launch(ex.expert_parallel_step, world_size=world_size, timeout=60, **moe)
        ref = ex.moe_reference(world_size, **moe)
        torch.testing.assert_close(torch.cat([r["out"] for r in run.results]), ref["out"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.cat([r["dx"] for r in run.results]), ref["dx"], atol=1e-5, rtol=1e-4)
        for r in run.results:
            for name, g in r["grads"].items():
                torch.testing.assert_close(g, ref["grads"][name], atol=1e-5, rtol=1e-4, msg=name)
            one = ex.predicted_all_to_all_bytes(world_size, 4, r["capacity"], gpt.GPTConfig().d_model)
            assert r["sent"] == {"forward": 2 * one, "backward": 2 * one}
        assert len({name for r in run.results for name in r["grads"]}) == len(ref["grads"])
        assert sum(r["dropped"] for r in run.results) == ref["dropped"] > 0


def test_training_the_moe_gpt_lowers_the_loss_and_records_every_token():
    trained = ex.train_moe(steps=12, batch_size=8)
    assert trained["losses"][-1] < trained["losses"][0] - 0.5
    assert all(sum(load) == 8 * gpt.GPTConfig().block_size for load in trained["loads"])
    dropped = ex.dropped_by_capacity(trained["model"], (0.5, 1.0, 2.0, 4.0))
    assert dropped[0.5] >= 0.5 and dropped[4.0] == 0 and dropped[0.5] >= dropped[1.0] >= dropped[2.0]
