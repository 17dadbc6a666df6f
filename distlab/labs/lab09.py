"""Lab 09 · Distributed inference: serving the tiny GPT through a pipeline of stages, micro-batch by micro-batch,
and the attention step of a KV-cached decoder.

The student's serving loop runs on 3 real ranks (a first, a middle and a last stage of the GPT), with
ctx.comm limited to send/recv/isend/irecv (every transfer logged). Each stage's forward is timestamped by the check, so
it can tell whether the stages overlapped (stage 1 at work while stage 0 still computes); the answers
must equal the unsplit model's, in request order; a deadlock is caught and named. The passed check sets
its measured latency and throughput beside distlab's own `inference.serve_pipelined`.

The cached attention step (one new token against the cached keys and values) runs in-process on a block of
the serving GPT: the grown cache and the output are compared with `serving.attend` and with the last row of
`gpt.Attention`'s full causal forward; the usual slips (the token not attending to itself, no 1/√d scale,
softmax across heads, the new key put first) are named.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from .. import gpt
from ..parallel import inference
from ..parallel import serving as sv
from ..parallel.pipeline import stage_module
from .grading import (
    Passed,
    Wrong,
    call_student,
    check_tensor,
    exercise,
    first_difference,
    on_ranks,
    point_to_point_only,
)

N_REQUESTS, MICRO_BATCH, STAGES = 30, 4, 3  # 8 micro-batches, the last of 2 requests; a middle stage
HINT = "Stages pass activations to their neighbour: send/recv between stage r and r + 1."
ATOL = 1e-4


class TimedStage:
    """This rank's stage, as the student calls it: every call is timestamped (one call = one micro-batch).

    The times are the machine's monotonic clock, the same in every rank's process: a rank that leaves the
    barrier late must not look as if it had started early."""

    def __init__(self, module, stage: int):
        self.module, self.stage, self.events = module, stage, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        y = self.module(x)
        self.events.append(dict(stage=self.stage, kind="F", micro=len(self.events), start=start,
                                end=time.perf_counter(), size=len(x)))
        return y


@torch.no_grad()
def run_serving(ctx, solution, n_requests: int = N_REQUESTS, micro_batch: int = MICRO_BATCH) -> dict:
    """On every rank: the student's serving loop on this rank's stage, then distlab's serve_pipelined."""
    cfg = gpt.GPTConfig()
    module = stage_module(gpt.gpt(cfg, 0), ctx.rank, ctx.world_size).to(ctx.device).eval()
    prompts = inference.requests(n_requests, cfg).to(ctx.device)
    module(torch.randn(micro_batch, cfg.block_size, cfg.d_model, device=ctx.device) if ctx.rank else prompts[:1])
    stage = TimedStage(module, ctx.rank)
    dist.barrier()
    with point_to_point_only(ctx, HINT) as (student_ctx, transfers):
        out = solution(student_ctx, stage, prompts, micro_batch, cfg.d_model)
    library = inference.serve_pipelined(ctx, n_requests, micro_batch)["events"]
    return {"events": stage.events, "answers": out.cpu() if torch.is_tensor(out) else out,
            "transfers": list(transfers), "library": library}


def expected_answers(n_requests: int = N_REQUESTS) -> torch.Tensor:
    """The unsplit model's logits at the last position of every request."""
    with torch.no_grad():
        return gpt.gpt(gpt.GPTConfig(), 0)(inference.requests(n_requests))[:, -1]


def _explain_flow(results: list[dict], p: int) -> None:
    """Each stage runs one forward per micro-batch and sends each on to the next stage, only there."""
    count = -(-N_REQUESTS // MICRO_BATCH)
    for stage, result in enumerate(results):
        forwards = [e["size"] for e in result["events"]]
        if len(forwards) != count:
            whole = " — the whole batch at once" if forwards == [N_REQUESTS] else ""
            raise Wrong(f"stage {stage} ran its layers {len(forwards)} time(s), on {forwards} requests{whole}. With "
                        f"micro_batch = {MICRO_BATCH} it should run them {count} times, once per micro-batch "
                        f"(prompts.split(micro_batch)), so the next stage can start on the first while this one "
                        "computes the second")
        sends = [t for t in result["transfers"] if t["kind"] == "send"]
        targets = {t["dst"] for t in sends}
        if stage < p - 1 and (targets != {stage + 1} or len(sends) != count):
            raise Wrong(f"stage {stage} sent {len(sends)} message(s) to ranks {sorted(targets)}: it should send each "
                        f"of its {count} micro-batches' activations to the next stage, rank {stage + 1}, once")
        if stage == p - 1 and sends:
            raise Wrong(f"the last stage (rank {stage}) sent {len(sends)} message(s): it answers, it has no one to "
                        "send activations to")


def _explain_answers(answers, expected: torch.Tensor, p: int) -> None:
    if not torch.is_tensor(answers):
        raise Wrong(f"the last stage (rank {p - 1}) returned {type(answers).__name__}: return its answers, the "
                    "logits at the last position of every request, as one tensor (torch.cat over micro-batches)")
    if answers.dim() == 3 and answers.shape[0] == expected.shape[0]:
        raise Wrong(f"the last stage returned logits of shape {tuple(answers.shape)}, every position of every "
                    f"prompt: a request's answer is the last position's, y[:, -1] ({tuple(expected.shape)} in all)")
    if answers.shape != expected.shape:
        raise Wrong(f"the last stage returned shape {tuple(answers.shape)}, expected {tuple(expected.shape)}: one row "
                    "of logits per request, in request order")
    if first_difference(answers, expected, ATOL) is None:
        return
    rows = [next((j for j in range(len(expected)) if first_difference(answers[j], e, ATOL) is None), None)
            for e in expected]
    if None not in rows:
        k = next(k for k, j in enumerate(rows) if j != k)
        raise Wrong(f"right answers, wrong order: the answer to request {k} is in row {rows[k]}. Return them in "
                    "request order: micro-batch 0 first, each micro-batch's rows in order")
    index, value, should = first_difference(answers, expected, ATOL)
    raise Wrong(f"the answer to request {index[0]} is wrong at logit {index[1]}: {value:.6g}, the unsplit model "
                f"gives {should:.6g}")


def _overlap(results: list[dict]) -> float:
    """Seconds that stage 1 was already at work before stage 0 finished its last micro-batch (< 0: none)."""
    return results[0]["events"][-1]["end"] - results[1]["events"][0]["start"]


def _no_overlap(results: list[dict]) -> Wrong:
    began = results[0]["events"][0]["start"]
    first, last = (results[1]["events"][0]["start"] - began) * 1e3, (results[0]["events"][-1]["end"] - began) * 1e3
    return Wrong(f"the stages did not overlap: stage 1 started its first micro-batch {first:.1f} ms after stage 0 "
                 f"started its first, when stage 0 had already finished its last, at {last:.1f} ms. Send each "
                 "micro-batch's activations as soon as it is computed (ctx.comm.isend), not after the loop, so "
                 "stage 1 works on micro-batch j while stage 0 computes j + 1")


def _serve(fn, p: int) -> list[dict]:
    """Run and check on p ranks; the overlap is timing, so a miss is run once more before it counts."""
    expected = expected_answers()
    for _ in range(2):
        results = on_ranks(run_serving, p, solution=fn).results
        _explain_flow(results, p)
        _explain_answers(results[-1]["answers"], expected, p)
        if _overlap(results) > 0:
            return results
    raise _no_overlap(results)


@exercise("09.pipelined_inference", "Pipelined inference over micro-batches")
def pipelined_inference(fn) -> Passed:
    results = _serve(fn, STAGES)
    yours = inference.latency_throughput([e for r in results for e in r["events"]], N_REQUESTS)
    library = inference.latency_throughput([e for r in results for e in r["library"]], N_REQUESTS)
    sent = sum(t["bytes"] for t in results[0]["transfers"] if t["kind"] == "send")
    return Passed(f"on {STAGES} ranks (first, middle and last stage): {N_REQUESTS} answers equal the unsplit model's, "
                  "in request order; one forward and one message per micro-batch per stage, and the stages overlapped",
                  {"latency, throughput": f"yours {yours['latency_ms']:.1f} ms, {yours['throughput']:.0f} requests/s; "
                                          f"inference.serve_pipelined {library['latency_ms']:.1f} ms, "
                                          f"{library['throughput']:.0f} requests/s",
                   "overlap": f"stage 1 was at work {_overlap(results) * 1e3:.1f} ms before stage 0 finished its last "
                              "micro-batch",
                   "stage 0 sent": f"{sent:,} bytes in {-(-N_REQUESTS // MICRO_BATCH)} messages"})


# -- 09.cached_attention: one decode step of attention against the KV cache ------------------------------

CACHED = 11  # positions already in the cache when the new token comes


def _projections(length: int, seed: int = 0):
    """A block of the serving GPT, a random sequence through it, and its q, k, v (heads, length, head_dim)."""
    attn = sv.serving_model(seed)[1].attn
    x = torch.randn(1, length, sv.SERVING_CFG.d_model, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        q, k, v = (attn.heads(layer(x))[0] for layer in (attn.q, attn.k, attn.v))
    return attn, x, q, k, v


def _attention(q, k, v, scale: bool = True, over: int = -1) -> torch.Tensor:
    """softmax over positions (over=-1) or heads (over=0) of q·k (scaled or not), times v: (heads, head_dim)."""
    scores = (k @ q[:, :, None]).squeeze(-1) / (math.sqrt(q.size(-1)) if scale else 1.0)
    return (scores.softmax(over)[:, None] @ v).squeeze(1)


def _explain_cache(k_out, k_past, k_new, what: str) -> None:
    if torch.is_tensor(k_out) and k_out.shape == k_past.shape:
        raise Wrong(f"the {what} cache you returned still has {k_past.shape[1]} positions: append the new token's "
                    f"to it (torch.cat along dim 1), so the next step finds {k_past.shape[1] + 1}")
    first = torch.cat([k_new[:, None], k_past], dim=1)
    if torch.is_tensor(k_out) and k_out.shape == first.shape and torch.allclose(k_out, first):
        raise Wrong(f"the new token's {what} is at position 0 of the returned cache: positions stay in order, "
                    "append it at the end")
    check_tensor(k_out, torch.cat([k_past, k_new[:, None]], dim=1), f"the returned {what} cache")


def _explain_output(out, q, k, v) -> None:
    expected = sv.attend(q[None, :, None], k[None], v[None], sv.hidden(torch.tensor([[k.shape[1] - 1]]), k.shape[1]))
    expected = expected[0, :, 0]
    if torch.is_tensor(out) and out.shape == expected.shape and first_difference(out, expected, 1e-5) is not None:
        slips = [(_attention(q, k[:, :-1], v[:, :-1]), "your output attends only to the earlier positions: the new "
                  "token attends to itself too (append its key and value first, then attend over all L + 1)"),
                 (_attention(q, k, v, scale=False), "the scores are not divided by √head_dim "
                  f"(√{q.size(-1)} = {math.sqrt(q.size(-1)):.0f}): softmax(q·k / √d)"),
                 (_attention(q, k, v, over=0), "the softmax runs across the heads: each head's weights sum to "
                  "one over the positions (the last dimension of the scores)")]
        for wrong, says in slips:
            if first_difference(out, wrong, 1e-5) is None:
                raise Wrong(says)
    check_tensor(out, expected, "the attention output (heads, head_dim)")


def _seconds(fn, *args, repeats: int = 5) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats


@exercise("09.cached_attention", "One decode step of attention against the KV cache")
def cached_attention(fn) -> Passed:
    attn, x, q, k, v = _projections(CACHED + 1)
    past = (k[:, :CACHED].clone(), v[:, :CACHED].clone())
    returned = call_student(fn, q[:, -1].clone(), k[:, -1].clone(), v[:, -1].clone(), *past)
    if not (isinstance(returned, tuple) and len(returned) == 3):
        raise Wrong(f"return three things, (out, k_cache, v_cache); got {type(returned).__name__}")
    out, k_out, v_out = returned
    _explain_cache(k_out, past[0], k[:, -1], "key")
    _explain_cache(v_out, past[1], v[:, -1], "value")
    _explain_output(out, q[:, -1], k, v)
    with torch.no_grad():
        full, projected = attn(x)[0, -1], attn.proj(out.reshape(-1))
    check_tensor(projected, full, "your output through the block's projection")
    _, x_long, q_long, k_long, v_long = _projections(121)
    with torch.no_grad():
        step = _seconds(fn, q_long[:, -1], k_long[:, -1], v_long[:, -1], k_long[:, :-1], v_long[:, :-1])
        recompute = _seconds(attn, x_long)
    return Passed(f"the new token's output equals serving.attend and the last row of gpt.Attention's full causal "
                  f"forward over {CACHED + 1} positions; the caches grew by one, in order",
                  {"difference to the full forward": f"{(projected - full).abs().max().item():.1e} (after the block's "
                                                     "output projection)",
                   "at 120 cached positions": f"your step {1e6 * step:.0f} µs; gpt.Attention recomputing all 121 "
                                              f"positions {1e6 * recompute:.0f} µs"})
