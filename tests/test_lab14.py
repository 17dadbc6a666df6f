"""Lab 14: typical wrong answers get the diagnosis that names their mistake (the reference solutions pass
in test_labs.py)."""

import pytest
import torch

from distlab.labs import grading
from distlab.labs.solutions import ref14


def merge_averaged(out_a, lse_a, out_b, lse_b):
    return (out_a + out_b) / 2, torch.logaddexp(lse_a, lse_b)


def merge_naive_exp(out_a, lse_a, out_b, lse_b):
    """Right on paper, but exp() of scores in the hundreds overflows float32."""
    total = lse_a.exp() + lse_b.exp()
    return (lse_a.exp() * out_a + lse_b.exp() * out_b) / total, total.log()


def merge_lse_max(out_a, lse_a, out_b, lse_b):
    out, _ = ref14.merge_blocks(out_a, lse_a, out_b, lse_b)
    return out, torch.maximum(lse_a, lse_b)


def merge_weights_swapped(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    return (lse_b - lse).exp() * out_a + (lse_a - lse).exp() * out_b, lse


def merge_lse_added(out_a, lse_a, out_b, lse_b):
    out, _ = ref14.merge_blocks(out_a, lse_a, out_b, lse_b)
    return out, lse_a + lse_b


@pytest.mark.parametrize("solution, says", [
    (merge_averaged, "plain average"),
    (merge_naive_exp, "overflows float32"),
    (merge_lse_max, "your lse is the larger of the two"),
    (merge_weights_swapped, "the other block's share"),
    (merge_lse_added, "the log of the product"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_merge_gets_its_diagnosis(solution, says):
    verdict = grading.grade("14.merge_blocks", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def slots_token_major(choices, n_experts, capacity):
    slots, filled = torch.full_like(choices, -1), [0] * n_experts
    for t in range(choices.size(0)):
        for j in range(choices.size(1)):
            e = int(choices[t, j])
            if filled[e] < capacity:
                slots[t, j] = filled[e]
            filled[e] += 1
    return slots


def slots_no_capacity(choices, n_experts, capacity):
    return ref14.assign_slots(choices, n_experts, capacity=10**9)


def slots_one_too_many(choices, n_experts, capacity):
    return ref14.assign_slots(choices, n_experts, capacity + 1)


def slots_restart_per_choice(choices, n_experts, capacity):
    return torch.cat([ref14.assign_slots(choices[:, j:j + 1], n_experts, capacity) for j in range(choices.size(1))], 1)


def slots_as_list(choices, n_experts, capacity):
    return ref14.assign_slots(choices, n_experts, capacity).tolist()


@pytest.mark.parametrize("solution, says", [
    (slots_token_major, "token by token"),
    (slots_no_capacity, "tokens past the capacity are dropped"),
    (slots_one_too_many, "off by one"),
    (slots_restart_per_choice, "start again at slot 0"),
    (slots_as_list, "return a tensor"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_dispatch_gets_its_diagnosis(solution, says):
    verdict = grading.grade("14.assign_slots", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)
