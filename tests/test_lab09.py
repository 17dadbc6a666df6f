"""Lab 09: typical wrong answers get the diagnosis that names their mistake (the reference solution passes
in test_labs.py)."""

import math
import time

import pytest
import torch

from conftest import rank_processes
from distlab.labs import grading


def _receive(ctx, prompts, size, d_model):
    return ctx.comm.recv(torch.empty(size, prompts.shape[1], d_model, device=prompts.device), ctx.rank - 1)


def whole_batch(ctx, module, prompts, micro_batch, d_model):
    """Right answers, but every stage waits for (and sends) the whole batch: no pipelining at all."""
    x = prompts if ctx.rank == 0 else _receive(ctx, prompts, len(prompts), d_model)
    y = module(x)
    if ctx.rank == ctx.world_size - 1:
        return y[:, -1]
    ctx.comm.send(y, ctx.rank + 1)


def sends_after_the_loop(ctx, module, prompts, micro_batch, d_model):
    """Micro-batches, but stage r sends only once it has computed all of them: the next stage waits."""
    chunks = prompts.split(micro_batch)
    outs = [module(c if ctx.rank == 0 else _receive(ctx, prompts, len(c), d_model)) for c in chunks]
    if ctx.rank == ctx.world_size - 1:
        return torch.cat([y[:, -1] for y in outs])
    for y in outs:
        ctx.comm.send(y, ctx.rank + 1)


def _pipelined(answer):
    def serve(ctx, module, prompts, micro_batch, d_model):
        last, answers = ctx.world_size - 1, []
        for chunk in prompts.split(micro_batch):
            y = module(chunk if ctx.rank == 0 else _receive(ctx, prompts, len(chunk), d_model))
            if ctx.rank == last:
                answer(answers, y)
            else:
                ctx.comm.send(y, ctx.rank + 1)
        return torch.cat(answers) if ctx.rank == last else None
    return serve


answers_reversed = _pipelined(lambda answers, y: answers.insert(0, y[:, -1]))
every_position = _pipelined(lambda answers, y: answers.append(y))


def waits_for_an_acknowledgement(ctx, module, prompts, micro_batch, d_model):
    """Each stage waits for the next one to confirm every micro-batch; nobody ever sends the confirmation."""
    for chunk in prompts.split(micro_batch):
        y = module(chunk if ctx.rank == 0 else _receive(ctx, prompts, len(chunk), d_model))
        if ctx.rank < ctx.world_size - 1:
            ctx.comm.send(y, ctx.rank + 1)
            ctx.comm.recv(torch.zeros(1, device=prompts.device), ctx.rank + 1)


def uses_a_barrier(ctx, module, prompts, micro_batch, d_model):
    ctx.comm.barrier()


@pytest.mark.parametrize("solution, says", [
    (whole_batch, "ran its layers 1 time(s), on [30] requests — the whole batch at once"),
    (sends_after_the_loop, "the stages did not overlap"),
    (answers_reversed, "right answers, wrong order: the answer to request 0 is in row 26"),
    (every_position, "every position of every prompt"),
    (uses_a_barrier, "not ctx.comm.barrier"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_serving_loop_gets_its_diagnosis(solution, says):
    verdict = grading.grade("09.pipelined_inference", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_a_deadlocking_serving_loop_is_named_quickly_and_leaves_no_process(monkeypatch):
    monkeypatch.setattr(grading, "LAB_TIMEOUT", 3.0)
    started = time.monotonic()
    verdict = grading.grade("09.pipelined_inference", waits_for_an_acknowledgement)
    assert time.monotonic() - started < 30
    assert verdict.summary.startswith("deadlock: all 3 ranks were blocked in recv"), str(verdict)
    assert not rank_processes()


def _append(cache, new):
    return torch.cat([cache, new[:, None]], dim=1)


def _attend(q, k, v, scale=True, over=-1):
    scores = (k @ q[:, :, None]).squeeze(-1) / (math.sqrt(q.size(-1)) if scale else 1.0)
    return (scores.softmax(over)[:, None] @ v).squeeze(1)


def attends_only_to_the_past(q, k_new, v_new, k_cache, v_cache):
    """Attends before appending: the new token does not see itself."""
    out = _attend(q, k_cache, v_cache)
    return out, _append(k_cache, k_new), _append(v_cache, v_new)


def unscaled(q, k_new, v_new, k_cache, v_cache):
    k_cache, v_cache = _append(k_cache, k_new), _append(v_cache, v_new)
    return _attend(q, k_cache, v_cache, scale=False), k_cache, v_cache


def softmax_across_heads(q, k_new, v_new, k_cache, v_cache):
    k_cache, v_cache = _append(k_cache, k_new), _append(v_cache, v_new)
    return _attend(q, k_cache, v_cache, over=0), k_cache, v_cache


def new_token_first(q, k_new, v_new, k_cache, v_cache):
    k_cache, v_cache = torch.cat([k_new[:, None], k_cache], 1), torch.cat([v_new[:, None], v_cache], 1)
    return _attend(q, k_cache, v_cache), k_cache, v_cache


def cache_not_grown(q, k_new, v_new, k_cache, v_cache):
    return _attend(q, _append(k_cache, k_new), _append(v_cache, v_new)), k_cache, v_cache


@pytest.mark.parametrize("solution, says", [
    (attends_only_to_the_past, "attends only to the earlier positions"),
    (unscaled, "not divided by √head_dim"),
    (softmax_across_heads, "the softmax runs across the heads"),
    (new_token_first, "is at position 0 of the returned cache"),
    (cache_not_grown, "cache you returned still has 11 positions"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_cached_attention_step_gets_its_diagnosis(solution, says):
    verdict = grading.grade("09.cached_attention", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)
