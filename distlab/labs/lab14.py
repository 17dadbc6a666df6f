"""Lab 14 · Sequence and expert parallelism: the online-softmax merge of two attention blocks, and the
router's dispatch of tokens to expert slots under a capacity.

Both are graded in-process against the library (`parallel/context_parallel.py`, `parallel/experts.py`).
The merge runs on blocks whose scores are large enough that a naive exp overflows, then folds a whole
ring's worth of blocks from the empty state (out 0, lse −inf) and must equal attention over all the keys.
The dispatch runs on top-1 and top-2 routings with tight and loose capacities; before comparing slot by
slot the check recognises the usual slips (no capacity, token-major priority, a capacity off by one,
second choices that forget the slots the first choices took).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..parallel import context_parallel as cp
from ..parallel import experts as ex
from .grading import Passed, Wrong, call_student, check_tensor, exercise

# -- 14.merge_blocks ------------------------------------------------------------------------------------------

SCALE = 40.0  # scores of a few hundred: exp() of them overflows float32, exp() of differences does not


def merge_case(seed: int, t_a: int = 5, t_b: int = 7, scale: float = SCALE) -> tuple[torch.Tensor, ...]:
    """Queries and two disjoint key blocks (different sizes); scores of order `scale`·√d."""
    generator = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(2, 3, 4, 8, generator=generator)
    k_a, k_b = torch.randn(2, 3, t_a, 8, generator=generator), torch.randn(2, 3, t_b, 8, generator=generator)
    v_a, v_b = torch.randn(2, 3, t_a, 8, generator=generator), torch.randn(2, 3, t_b, 8, generator=generator)
    return q, k_a, v_a, k_b, v_b


def _student_merge(fn: Callable, out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    given = [t.clone() for t in (out_a, lse_a, out_b, lse_b)]
    result = call_student(fn, *given)
    if not (isinstance(result, tuple) and len(result) == 2 and all(torch.is_tensor(t) for t in result)):
        raise Wrong(f"your merge returned {type(result).__name__}: return a pair of tensors (out, lse)")
    return result


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=1e-4, rtol=1e-4))


def _explain_merge(out, lse, out_a, lse_a, out_b, lse_b) -> None:
    expected_out, expected_lse = cp.merge(out_a, lse_a, out_b, lse_b)
    if not torch.isfinite(out).all() or not torch.isfinite(lse).all():
        raise Wrong("your merge gives inf or nan: the log-sum-exps here are in the hundreds and exp() of them "
                    "overflows float32. Work with differences: the new lse is torch.logaddexp(lse_a, lse_b), and "
                    "each block's weight is exp(lse_x − lse), at most 1")
    if _close(out, (out_a + out_b) / 2):
        raise Wrong("your out is the plain average of the two blocks: each block must be weighted by its share "
                    "of the softmax's denominator, exp(lse_a − lse) and exp(lse_b − lse), not 1/2 each")
    if _close(out, out_a + out_b):
        raise Wrong("your out is out_a + out_b: each block was normalised by its own sum, so reweight each by "
                    "its share of the total, exp(lse_x − lse), before adding")
    _, both = cp.merge(out_a, lse_a, out_b, lse_b)
    if _close(out, (lse_b - both).exp() * out_a + (lse_a - both).exp() * out_b):
        raise Wrong("you weighted each block by the other block's share: out_a gets exp(lse_a − lse), "
                    "out_b gets exp(lse_b − lse)")
    check_tensor(out, expected_out, "the merged out", atol=1e-4)
    if _close(lse, torch.maximum(lse_a, lse_b)):
        raise Wrong("your lse is the larger of the two: the log of a sum is log(exp(lse_a) + exp(lse_b)) = "
                    "torch.logaddexp(lse_a, lse_b), a little more than the max; the next merge needs it exact")
    if _close(lse, lse_a + lse_b):
        raise Wrong("your lse is lse_a + lse_b, the log of the product: the softmax denominators add, so the "
                    "new lse is log(exp(lse_a) + exp(lse_b)) = torch.logaddexp(lse_a, lse_b)")
    check_tensor(lse, expected_lse, "the merged lse", atol=1e-4)


def _fold(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: int) -> torch.Tensor:
    """The student's merge over `blocks` key blocks one at a time, from the empty state, as a ring rank does."""
    out, lse = torch.zeros_like(q), torch.full((*q.shape[:-1], 1), float("-inf"))
    for k_part, v_part in zip(k.chunk(blocks, dim=-2), v.chunk(blocks, dim=-2)):
        out, lse = _student_merge(fn, out, lse, *cp.block_attention(q, k_part, v_part, causal=False))
    return out


@exercise("14.merge_blocks", "The online-softmax merge of two attention blocks")
def merge_blocks(fn) -> Passed:
    for seed in (0, 1, 2):
        q, k_a, v_a, k_b, v_b = merge_case(seed)
        parts = (*cp.block_attention(q, k_a, v_a, False), *cp.block_attention(q, k_b, v_b, False))
        out, lse = _student_merge(fn, *parts)
        _explain_merge(out, lse, *parts)
        whole = cp.block_attention(q, torch.cat([k_a, k_b], -2), torch.cat([v_a, v_b], -2), False)[0]
        check_tensor(out, whole, "the merged out against attention over both blocks at once", atol=1e-4)
    q, k, v, _, _ = merge_case(7, t_a=16)
    folded = _fold(fn, q, k, v, blocks=4)
    if not torch.isfinite(folded).all():
        raise Wrong("folding 4 blocks from the empty state (out = 0, lse = −inf) gives inf or nan: the first "
                    "merge has lse_a = −inf, and must give back block b unchanged (torch.logaddexp(−inf, x) = x, "
                    "exp(−inf − x) = 0)")
    check_tensor(folded, cp.block_attention(q, k, v, False)[0], "4 blocks folded one by one from the empty state",
                 atol=1e-4)
    gap = float((folded - cp.block_attention(q, k, v, False)[0]).abs().max())
    return Passed("equal to attention over all the keys, for 2 blocks with scores in the hundreds and for 4 "
                  "blocks folded from the empty state, as each ring-attention rank folds the blocks it receives",
                  {"largest difference to full attention (4 blocks folded)": f"{gap:.1e}"})


# -- 14.assign_slots ------------------------------------------------------------------------------------------

DISPATCH_CASES = ((64, 4, 1, 1.0), (64, 4, 2, 1.0), (48, 4, 2, 0.5), (40, 8, 2, 2.0), (30, 4, 1, 0.75))


def dispatch_case(tokens: int, n_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """A skewed routing (expert 0 favoured), choices distinct within a token, as topk gives them."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(tokens, n_experts, generator=generator) + torch.linspace(1.0, 0.0, n_experts)
    return scores.topk(top_k, dim=-1).indices


def token_major(choices: torch.Tensor, n_experts: int, cap: int) -> torch.Tensor:
    """The usual slip: slots handed out token by token (token 0's second choice before token 1's first)."""
    slots, filled = torch.full_like(choices, -1), [0] * n_experts
    for t in range(choices.size(0)):
        for j in range(choices.size(1)):
            e = int(choices[t, j])
            if filled[e] < cap:
                slots[t, j] = filled[e]
            filled[e] += 1
    return slots


def per_choice_restart(choices: torch.Tensor, n_experts: int, cap: int) -> torch.Tensor:
    """The slip of forgetting, for the second choices, the slots the first choices took."""
    return torch.cat([ex.assign_slots(choices[:, j:j + 1], n_experts, cap) for j in range(choices.size(1))], dim=1)


def _explain_slots(slots, choices: torch.Tensor, n_experts: int, cap: int, where: str) -> None:
    expected = ex.assign_slots(choices, n_experts, cap)
    if not torch.is_tensor(slots) or slots.shape != choices.shape:
        shape = tuple(slots.shape) if torch.is_tensor(slots) else type(slots).__name__
        raise Wrong(f"{where}: return a tensor of the choices' shape {tuple(choices.shape)} (one slot per token and "
                    f"choice, −1 when dropped), got {shape}")
    if torch.equal(slots, expected):
        return
    if int(slots.max()) >= cap:
        raise Wrong(f"{where}: a slot is {int(slots.max())} but an expert has only capacity = {cap} slots "
                    f"(0..{cap - 1})" + (": keeping one token too many, off by one" if int(slots.max()) == cap else
                       ": tokens past the capacity are dropped, slot −1"))
    if torch.equal(slots, ex.assign_slots(choices, n_experts, cap - 1)):
        raise Wrong(f"{where}: each expert keeps only {cap - 1} tokens, one fewer than capacity = {cap}: off by one "
                    "(slot s is kept while s < capacity)")
    if choices.size(1) > 1 and torch.equal(slots, token_major(choices, n_experts, cap)):
        raise Wrong(f"{where}: you filled the slots token by token, so token 0's second choice takes a slot before "
                    "token 1's first choice. GShard's and Switch's priority: every token's first choice first, then "
                    "the second choices, each pass in token order")
    if choices.size(1) > 1 and torch.equal(slots, per_choice_restart(choices, n_experts, cap)):
        raise Wrong(f"{where}: your second choices start again at slot 0: they must continue after the slots the "
                    "first choices already took in that expert")
    bad = (slots != expected).nonzero()[0].tolist()
    raise Wrong(f"{where}: token {bad[0]}'s choice {bad[1]} (expert {int(choices[bad[0], bad[1]])}) got slot "
                f"{int(slots[bad[0], bad[1]])}, should be {int(expected[bad[0], bad[1]])}")


@exercise("14.assign_slots", "The router's dispatch: top-k choices to expert slots under a capacity")
def assign_slots(fn) -> Passed:
    measured = {}
    for seed, (tokens, n_experts, top_k, factor) in enumerate(DISPATCH_CASES):
        choices = dispatch_case(tokens, n_experts, top_k, seed)
        cap = ex.capacity(tokens, n_experts, top_k, factor)
        where = f"{tokens} tokens, {n_experts} experts, top-{top_k}, capacity {cap}"
        slots = call_student(fn, choices.clone(), n_experts, cap)
        _explain_slots(slots, choices, n_experts, cap, where)
        measured[f"dropped ({where})"] = f"{int((slots < 0).sum())} of {slots.numel()}"
    return Passed(f"equal to experts.assign_slots on {len(DISPATCH_CASES)} routings (top-1 and top-2, capacity "
                  "factors 0.5 to 2)", measured)
