"""Lab 02 · Communication: a ring all-reduce and recursive doubling from send/recv, top-k with error feedback.

The collectives run on real ranks (2, 3 and 4 of them; sizes the world size does not divide; float32,
float64 and int64), with ctx.comm limited to send/recv/isend/irecv; every transfer is logged, so the
check can say which rank sent what to whom, and count the bytes against the cost model.
"""

from __future__ import annotations

import torch

from ..communication.cost import chunk_sizes, sent_bytes
from .grading import (
    Passed,
    Wrong,
    call_student,
    check_tensor,
    contributing_ranks,
    exercise,
    on_ranks,
    run_collective,
)

CASES = ((torch.float32, (10,)), (torch.float64, (3, 7)), (torch.int64, (13,)))
HINT = "The point of the exercise is to build the collective out of point-to-point messages."


# -- what the check says about a wrong result ---------------------------------------------------------

def _explain_values(outcomes: list[dict], n: int, case: int) -> None:
    """Raise Wrong naming the first rank, element and what it should have been (and the likely cause)."""
    given = [o[case]["given"] for o in outcomes]
    expected = torch.stack(given).sum(0)
    for rank, o in enumerate(outcomes):
        result = o[case]
        if torch.equal(result["after"], result["given"]) and isinstance(result["returned"], torch.Tensor) \
                and torch.allclose(result["returned"].double(), expected.double(), atol=1e-5):
            raise Wrong("your function returned the right sum but left `tensor` unchanged: like dist.all_reduce, "
                        "it must reduce in place (write into tensor, e.g. tensor.copy_(...) or chunk.add_(...))")
        if not result["returned_self"] and result["returned"] is not None:
            raise Wrong("return the tensor you were given (reduced in place), as dist.all_reduce leaves its "
                        "result in its argument")
        after = result["after"]
        if after.dtype.is_floating_point and torch.allclose(after, expected / n, atol=1e-5):
            raise Wrong(f"rank {rank} holds the sum divided by {n}: all_reduce with SUM adds; averaging "
                        "(dividing by N) is the caller's job, e.g. after averaging gradients")
        if not torch.allclose(after.double(), expected.double(), atol=1e-5):
            _explain_chunk(rank, after, given, n)


def _explain_chunk(rank: int, after: torch.Tensor, given: list[torch.Tensor], n: int) -> None:
    flat, parts = after.reshape(-1), [g.reshape(-1) for g in given]
    start = 0
    for chunk, size in enumerate(chunk_sizes(flat.numel(), n)):
        window = slice(start, start + size)
        expected = torch.stack([p[window] for p in parts]).sum(0)
        if not torch.allclose(flat[window].double(), expected.double(), atol=1e-5):
            bad = int((~torch.isclose(flat[window].double(), expected.double(), atol=1e-5)).nonzero()[0]) + start
            detail = (f"element {bad} (flat index; chunk {chunk} = elements {start}..{start + size - 1}) on rank "
                      f"{rank} is {float(flat[bad]):.6g}, should be {float(expected[bad - start]):.6g}")
            holders = contributing_ranks(flat[window], [p[window] for p in parts])
            if holders is not None and len(holders) < n:
                raise Wrong(f"chunk {chunk} on rank {rank} holds the sum of ranks {sorted(holders)} only: it was "
                            f"added around the ring {len(holders) - 1} time(s), not {n - 1}. Look for an off-by-one in "
                            "the number of steps, or in which chunk a rank sends at step s (rank r sends chunk "
                            "(r - s) % N in reduce-scatter, (r + 1 - s) % N in all-gather)", detail)
            raise Wrong(f"rank {rank}'s result is wrong in chunk {chunk}", detail)
        start += size


def _explain_neighbours(outcomes: list[dict], n: int, case: int) -> None:
    for rank, o in enumerate(outcomes):
        transfers = o[case]["transfers"]
        sends = {t["dst"] for t in transfers if t["kind"] == "send"}
        recvs = {t["src"] for t in transfers if t["kind"] == "recv"}
        right, left = (rank + 1) % n, (rank - 1) % n
        if not (sends <= {right} and recvs <= {left}) and not (sends <= {left} and recvs <= {right}):
            raise Wrong(f"rank {rank} sent to {sorted(sends)} and received from {sorted(recvs)}: in a ring, rank r "
                        f"sends only to one neighbour, (r + 1) % N, and receives only from the other, (r - 1) % N "
                        f"(here {right} and {left})")


def _explain_ring_bytes(outcomes: list[dict], n: int, case: int, numel: int, element_size: int) -> None:
    for rank, o in enumerate(outcomes):
        transfers = o[case]["transfers"]
        sent = sum(t["bytes"] for t in transfers if t["kind"] == "send")
        model = sent_bytes("ring", numel, element_size, n, rank)
        if sent != model:
            whole = 2 * (n - 1) * numel * element_size
            why = (" — that is the whole tensor at every step: send one chunk (tensor_split into N) per step"
                   if sent == whole else "")
            raise Wrong(f"rank {rank} sent {sent} bytes; a ring all-reduce of {numel} numbers on {n} ranks sends "
                        f"2(N-1)/N·S = {model} bytes from this rank{why}")


# -- the exercises ------------------------------------------------------------------------------------

@exercise("02.ring_all_reduce", "Ring all-reduce from send and recv")
def ring_all_reduce(fn) -> Passed:
    measured, figure = {}, None
    for n in (4, 3, 2):  # the largest first: most mistakes show there, and its ranks stay warm for the next try
        timed = 2**18 if n == 4 else 0
        outcomes = on_ranks(run_collective, n, solution=fn, cases=CASES, hint=HINT, timed_numel=timed).results
        for case, (dtype, shape) in enumerate(CASES):
            numel = torch.Size(shape).numel()
            _explain_neighbours(outcomes, n, case)
            _explain_values(outcomes, n, case)
            _explain_ring_bytes(outcomes, n, case, numel, torch.empty((), dtype=dtype).element_size())
        if n == 4:
            sent = sum(t["bytes"] for t in outcomes[0][0]["transfers"] if t["kind"] == "send")
            model = sent_bytes("ring", 10, 4, 4, 0)
            measured["bytes sent by rank 0, 10 float32 on 4 ranks"] = f"{sent} (cost model 2(N-1)/N·S: {model})"
            timed = outcomes[0][-1]
            measured["1 MB on 4 ranks"] = (f"yours {timed['yours_s'] * 1e3:.2f} ms, dist.all_reduce "
                                           f"{timed['builtin_s'] * 1e3:.2f} ms")
            figure = _figure([o[0]["transfers"] for o in outcomes])
    return Passed("correct on 2, 3 and 4 ranks (float32, float64, int64; sizes N does not divide), in place, "
                  "bytes per rank exactly the ring's 2(N-1)/N·S", measured, figure)


def _figure(transfers: list[list[dict]]):
    from ..viz.communication import timeline_figure

    return timeline_figure(transfers, title="Your ring's sends and receives, as recorded (4 ranks, 10 numbers)")


@exercise("02.recursive_doubling", "Recursive-doubling all-reduce (world sizes 2 and 4)")
def recursive_doubling(fn) -> Passed:
    for n in (4, 2):
        outcomes = on_ranks(run_collective, n, solution=fn, cases=CASES, hint=HINT).results
        for case, (dtype, shape) in enumerate(CASES):
            _explain_values(outcomes, n, case)
            numel, size = torch.Size(shape).numel(), torch.empty((), dtype=dtype).element_size()
            for rank, o in enumerate(outcomes):
                sends = [t["dst"] for t in o[case]["transfers"] if t["kind"] == "send"]
                partners = [rank ^ (1 << k) for k in range(n.bit_length() - 1)]
                if sends != partners:
                    raise Wrong(f"rank {rank} sent to ranks {sends} in that order; recursive doubling swaps with "
                                f"rank XOR 2^k in round k: {partners}")
                sent = sum(t["bytes"] for t in o[case]["transfers"] if t["kind"] == "send")
                if sent != sent_bytes("recursive_doubling", numel, size, n, rank):
                    raise Wrong(f"rank {rank} sent {sent} bytes; recursive doubling sends the whole vector once per "
                                f"round: log2(N)·S = {sent_bytes('recursive_doubling', numel, size, n, rank)}")
        if n == 4:
            first = outcomes[0][0]["transfers"]
            measured = {"rounds on 4 ranks": sum(t["kind"] == "send" for t in first),
                        "bytes sent by rank 0, 10 float32 on 4 ranks":
                            sum(t["bytes"] for t in first if t["kind"] == "send")}
    return Passed("correct on 2 and 4 ranks, in place; log2(N) rounds, partner rank XOR 2^k, S bytes per round",
                  measured)


@exercise("02.topk_error_feedback", "Top-k compression with error feedback")
def topk_error_feedback(fn) -> Passed:
    generator = torch.Generator().manual_seed(0)
    grad, residual, k = torch.randn(50, generator=generator), torch.randn(50, generator=generator) * 0.1, 5
    grad_before, residual_before = grad.clone(), residual.clone()
    out = call_student(fn, grad, residual, k)
    if not (isinstance(out, tuple) and len(out) == 3):
        raise Wrong(f"return (indices, values, new_residual), got {type(out).__name__}")
    indices, values, new_residual = out
    if not torch.equal(grad, grad_before) or not torch.equal(residual, residual_before):
        raise Wrong("your function changed its inputs: leave grad and residual as they were and return a new "
                    "residual (the caller may still need the gradient)")
    accumulated = grad + residual
    if not isinstance(indices, torch.Tensor) or indices.numel() != k:
        raise Wrong(f"send exactly k = {k} entries; got {getattr(indices, 'numel', lambda: '?')()}")
    chosen = set(indices.tolist())
    best = set(accumulated.abs().topk(k).indices.tolist())
    if chosen != best:
        if chosen == set(grad.abs().topk(k).indices.tolist()):
            raise Wrong("you chose the k largest entries of grad alone: error feedback adds the residual first "
                        "(accumulated = grad + residual), then picks the k largest of that")
        if chosen == set(accumulated.topk(k).indices.tolist()):
            raise Wrong("you chose the k largest values; top-k picks the k largest magnitudes |x| "
                        "(a large negative entry matters as much as a large positive one)")
        raise Wrong(f"indices {sorted(chosen)} are not the {k} largest |grad + residual|: {sorted(best)}")
    if isinstance(values, torch.Tensor) and values.shape == indices.shape and torch.equal(values, grad[indices]):
        raise Wrong("the values you send are grad[indices]: error feedback adds the residual first and sends "
                    "(grad + residual)[indices], or what was held back last time is lost")
    check_tensor(values, accumulated[indices], "values (accumulated[indices])")
    sent = torch.zeros_like(grad).index_put_((indices,), values)
    check_tensor(new_residual, accumulated - sent, "new_residual (what was not sent: accumulated - sent)")
    return Passed(f"sends {k} of {grad.numel()} entries; what was sent plus the new residual equals grad + residual "
                  "exactly, so nothing is ever lost, only delayed",
                  {"compression": f"{grad.numel() // k}x fewer numbers"})
