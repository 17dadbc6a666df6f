"""Lab 00 · Start here: a sum over all ranks written from send and recv.

The student's function runs on real ranks (4, then 3 of them; float32 and int64 tensors) with ctx.comm
limited to send/recv/isend/irecv; every transfer is logged. A wrong result is explained by what the rank
holds: its own value only, the sum of some ranks only (which ones), the sum divided by N, or rank 0 right
and the others never sent the total back.
"""

from __future__ import annotations

import torch

from ..communication.cost import sent_bytes
from .grading import (
    Passed,
    Wrong,
    check_tensor,
    contributing_ranks,
    exercise,
    on_ranks,
    run_collective,
)

CASES = ((torch.float32, (5,)), (torch.int64, (2, 3)))
HINT = "The point of the exercise is to add the ranks' tensors up with messages you send yourself."


def _explain(outcomes: list[dict], n: int, case: int) -> None:
    """Raise Wrong at the first rank whose result is not the sum, naming what it holds instead."""
    given = [o[case]["given"] for o in outcomes]
    expected = torch.stack(given).sum(0)
    results = [o[case]["returned"] for o in outcomes]
    for rank, result in enumerate(results):
        if not isinstance(result, torch.Tensor):
            raise Wrong(f"rank {rank} returned {type(result).__name__}: return the sum (a tensor) on every rank")
        if result.shape != expected.shape:
            break  # check_tensor below says it
        right_at_0 = isinstance(results[0], torch.Tensor) and torch.allclose(results[0].double(), expected.double())
        if rank > 0 and right_at_0 and torch.equal(result, given[rank]):
            raise Wrong(f"rank 0 holds the sum, but rank {rank} still holds only its own value: rank 0 must send "
                        f"the total back to every other rank (ranks 1..{n - 1}), and each must receive it")
        if torch.equal(result, given[rank]):
            raise Wrong(f"rank {rank} holds only its own value: it never received anything. Send every rank's "
                        "tensor to rank 0, add them there, then send the total back")
        if result.is_floating_point() and torch.allclose(result, expected / n, atol=1e-5):
            raise Wrong(f"rank {rank} holds the sum divided by {n}: the exercise asks for the sum (averaging is "
                        "a later step, e.g. for gradients)")
        if not torch.allclose(result.double(), expected.double(), atol=1e-5):
            holders = contributing_ranks(result, given)
            if holders is not None:
                missing = sorted(set(range(n)) - set(holders))
                raise Wrong(f"rank {rank} holds the sum of ranks {holders} only: ranks {missing} were never added. "
                            f"Look for an off-by-one in the loop over the other ranks: range(1, world_size) "
                            f"is 1..{n - 1}")
        check_tensor(result, expected, f"rank {rank}'s result")


@exercise("00.sum_by_send_recv", "A sum over all ranks from send and recv")
def sum_by_send_recv(fn) -> Passed:
    measured = {}
    for n in (4, 3):  # 4 first: most mistakes show there, and notebook 00 leaves 4 ranks warm
        timed = 2**16 if n == 4 else 0
        outcomes = on_ranks(run_collective, n, solution=fn, cases=CASES, hint=HINT, timed_numel=timed).results
        for case in range(len(CASES)):
            _explain(outcomes, n, case)
        if n == 4:
            sent = [sum(t["bytes"] for t in o[0]["transfers"] if t["kind"] == "send") for o in outcomes]
            naive = [sent_bytes("naive", 5, 4, 4, rank) for rank in range(4)]
            measured["bytes sent per rank, 5 float32 on 4 ranks"] = f"{sent} (gather at 0, send back: {naive})"
            timed = outcomes[0][-1]
            measured["256 KB on 4 ranks"] = (f"yours {timed['yours_s'] * 1e3:.2f} ms, dist.all_reduce "
                                             f"{timed['builtin_s'] * 1e3:.2f} ms")
    return Passed("the sum of every rank's tensor on every rank, on 4 and 3 ranks (float32 and int64), "
                  "from send/recv alone", measured)
