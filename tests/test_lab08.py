"""Lab 08: typical wrong answers get the diagnosis that names their mistake (the reference solutions pass
in test_labs.py)."""

import pytest
import torch
import torch.nn.functional as F

from distlab.labs import grading, lab08
from distlab.labs.solutions import ref08


def gpipe_backwards_reversed(m, p, stage):
    return [("F", i) for i in range(m)] + [("B", i) for i in reversed(range(m))]


def gpipe_missing_the_last(m, p, stage):
    return [("F", i) for i in range(m - 1)] + [("B", i) for i in range(m - 1)]


def gpipe_interleaved(m, p, stage):
    """A 1F1B list where GPipe was asked for."""
    return ref08.one_f_one_b_schedule(m, p, stage)


def gpipe_as_lists(m, p, stage):
    return [[kind, i] for kind, i in ref08.gpipe_schedule(m, p, stage)]


@pytest.mark.parametrize("solution, says", [
    (gpipe_backwards_reversed, "your backwards run in reverse order"),
    (gpipe_missing_the_last, "the forward of micro-batch 7, ('F', 7), is missing"),
    (gpipe_interleaved, "GPipe runs every forward (all m micro-batches) before any backward"),
    (gpipe_as_lists, "each action is a tuple"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_gpipe_gets_its_diagnosis(solution, says):
    verdict = grading.grade("08.gpipe_schedule", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def _one_f_one_b(warmup_of):
    def schedule(m, p, stage):
        warmup = min(warmup_of(p, stage), m)
        steady = [a for i in range(m - warmup) for a in (("F", warmup + i), ("B", i))]
        return [("F", i) for i in range(warmup)] + steady + [("B", i) for i in range(m - warmup, m)]
    return schedule


warmup_p_minus_stage = _one_f_one_b(lambda p, stage: p - stage)
warmup_p_minus_stage_minus_two = _one_f_one_b(lambda p, stage: max(p - stage - 2, 0))


def one_f_one_b_missing_a_micro_batch(m, p, stage):
    return [a for a in ref08.one_f_one_b_schedule(m, p, stage) if a[1] != m // 2]


def one_f_one_b_uncapped(m, p, stage):
    """Warm-up p - stage - 1 even when m is smaller: names micro-batches that do not exist."""
    warmup = p - stage - 1
    steady = [a for i in range(m - warmup) for a in (("F", warmup + i), ("B", i))]
    return [("F", i) for i in range(warmup)] + steady + [("B", i) for i in range(max(m - warmup, 0), m)]


@pytest.mark.parametrize("solution, says", [
    (warmup_p_minus_stage, "— off by one: a warm-up of min(p − stage − 1, m)"),
    (warmup_p_minus_stage_minus_two, "— off by one: a warm-up of min(p − stage − 1, m)"),
    (one_f_one_b_missing_a_micro_batch, "of micro-batch 4, ('F', 4), is missing"),
    (one_f_one_b_uncapped, "the warm-up is capped at m"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_one_f_one_b_gets_its_diagnosis(solution, says):
    verdict = grading.grade("08.one_f_one_b_schedule", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_a_deadlocking_schedule_is_named_by_the_simulator():
    """Stage 0 alternates from the start, stage 1 runs GPipe: stage 1's second forward waits for stage 0's, which
    waits behind a backward that waits for stage 1's first backward, which stage 1 runs only after that forward."""
    schedules = [ref08.one_f_one_b_schedule(4, 1, 0), ref08.gpipe_schedule(4, 2, 1)]
    with pytest.raises(grading.Wrong, match="your schedules deadlock on p = 2 stages, m = 4"):
        lab08._simulated_bubble(schedules, "1f1b", 4, 2)


def input_dimension_split(ctx, x, weight, bias):
    """Row-parallel: partial sums of the whole output, all-reduced (the right numbers, the wrong layer)."""
    n, rank = ctx.world_size, ctx.rank
    partial = F.linear(x.chunk(n, dim=-1)[rank], weight.chunk(n, dim=1)[rank])
    return ctx.comm.all_reduce(partial) + bias


def input_dimension_gathered(ctx, x, weight, bias):
    n, rank = ctx.world_size, ctx.rank
    partial = F.linear(x.chunk(n, dim=-1)[rank], weight.chunk(n, dim=1)[rank])
    return torch.stack(ctx.comm.all_gather(partial)).sum(0) + bias


def no_bias(ctx, x, weight, bias):
    mine = F.linear(x, weight.chunk(ctx.world_size, dim=0)[ctx.rank])
    return torch.cat(ctx.comm.all_gather(mine), dim=-1)


def rank_zero_bias(ctx, x, weight, bias):
    n = ctx.world_size
    mine = F.linear(x, weight.chunk(n, dim=0)[ctx.rank], bias[:bias.numel() // n])
    return torch.cat(ctx.comm.all_gather(mine), dim=-1)


def rotated_gather(ctx, x, weight, bias):
    """Puts its own slice first: the gathered list rotated by rank."""
    n, rank = ctx.world_size, ctx.rank
    pieces = ctx.comm.all_gather(F.linear(x, weight.chunk(n, dim=0)[rank], bias.chunk(n)[rank]))
    return torch.cat(pieces[rank:] + pieces[:rank], dim=-1)


def gathered_along_the_batch(ctx, x, weight, bias):
    n, rank = ctx.world_size, ctx.rank
    return torch.cat(ctx.comm.all_gather(F.linear(x, weight.chunk(n, dim=0)[rank], bias.chunk(n)[rank])))


def whole_layer_everywhere(ctx, x, weight, bias):
    return F.linear(x, weight, bias)


@pytest.mark.parametrize("solution, says", [
    (input_dimension_split, "called all_reduce and no all-gather: summing partial products is the row-parallel"),
    (input_dimension_gathered, "did you split the input dimension (weight.chunk(N, dim=1))?"),
    (no_bias, "slice has no bias"),
    (rank_zero_bias, "added the first 3 entries of the bias, rank 0's"),
    (rotated_gather, "put the slices together in the wrong order"),
    (gathered_along_the_batch, "you concatenated the slices along dim 0"),
    (whole_layer_everywhere, "called no all-gather"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_column_parallel_layer_gets_its_diagnosis(solution, says):
    verdict = grading.grade("08.column_parallel_linear", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)
