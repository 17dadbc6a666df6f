"""Lab 06 · Optimizers: Adam from its equations, and a ZeRO-1 sharded Adam step on real ranks.

Adam is graded in-process, step by step against torch.optim.Adam in float64 (to 1e-10), for two sets of
hyper-parameters; a wrong trajectory is matched against the usual slips (no bias correction, ε inside
the square root, β₁ and β₂ swapped, t counted from 0 or 2) to name the one made. The ZeRO-1 step runs
on 4 and 2 real ranks: after k steps every rank must hold what one plain Adam on the averaged gradient
holds, and the optimizer state each rank keeps is measured in bytes against the 1/N of a whole Adam.
"""

from __future__ import annotations

import math
import time

import torch

from ..optim.distributed import ShardedAdam, state_bytes
from .grading import Passed, Wrong, call_student, exercise, first_difference, on_ranks

ADAM_CASES = ({"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8}, {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-3})
ADAM_STEPS, ADAM_ATOL = 6, 1e-10


def adam_inputs(steps: int = ADAM_STEPS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A float64 parameter and one gradient per step, with magnitudes from 1e-3 to 1 (ε must matter)."""
    generator = torch.Generator().manual_seed(6)
    scale = torch.logspace(-3, 0, 12, dtype=torch.float64).view(3, 4)
    start = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    return start, [torch.randn(3, 4, generator=generator, dtype=torch.float64) * scale for _ in range(steps)]


def torch_adam(start: torch.Tensor, grads: list[torch.Tensor], lr: float, betas, eps: float) -> list[torch.Tensor]:
    """The built-in's trajectory: torch.optim.Adam's parameter after each step."""
    param = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([param], lr=lr, betas=betas, eps=eps)
    out = []
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        out.append(param.detach().clone())
    return out


# -- the usual slips, as trajectories to recognise ----------------------------------------------------

def _slip(kind: str, start, grads, lr, betas, eps) -> list[torch.Tensor]:
    """Adam with one typical mistake in it (only to name the student's mistake, never to grade)."""
    (b1, b2), param, m, v, out = betas, start.clone(), torch.zeros_like(start), torch.zeros_like(start), []
    if kind.startswith("swapped"):
        b1, b2 = b2, b1
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        c1, c2 = (betas if kind == "swapped moments" else (b1, b2))
        tc = t + 1 if kind == "t from 2" else t
        m_hat, v_hat = (m, v) if kind == "no bias correction" else (m / (1 - c1**tc), v / (1 - c2**tc))
        denominator = (v_hat + eps).sqrt() if kind == "eps inside" else v_hat.sqrt() + eps
        param = param - lr * m_hat / denominator
        out.append(param)
    return out


SLIPS = {
    "no bias correction": "you left out the bias correction: divide by 1 − βᵗ, m̂ = m/(1 − β₁ᵗ) and v̂ = v/(1 − β₂ᵗ), "
                          "or the first steps are far too large (m and v start at 0)",
    "eps inside": "you put ε inside the square root, √(v̂ + ε); Adam (and torch.optim.Adam) adds it outside: "
                  "m̂ / (√v̂ + ε)",
    "swapped": "β₁ and β₂ are swapped: β₁ (0.9) belongs to m, the mean of g, and β₂ (0.999) to v, the mean of g²",
    "swapped moments": "β₁ and β₂ are swapped in the moment updates: m ← β₁m + (1 − β₁)g and v ← β₂v + (1 − β₂)g²",
    "t from 2": "your step counter is off by one: the first step has t = 1, so its bias correction is 1 − β, "
                "not 1 − β² (increment t once per step, before using it)",
}


def _explain_adam(got: list[torch.Tensor], expected: list[torch.Tensor], start, grads, hyper: dict) -> None:
    """Raise Wrong at the first step where `got` leaves torch.optim.Adam's trajectory, naming the slip."""
    bad = next(step for step, (g, e) in enumerate(zip(got, expected)) if first_difference(g, e, ADAM_ATOL, 0))
    if not torch.isfinite(got[bad]).all():
        finite = torch.isfinite(got[bad])
        if bad == 0 and not finite.any():
            raise Wrong("every parameter is inf or nan after the first step: the bias correction divides by 1 − βᵗ, "
                        "which is 0 at t = 0. t counts from 1: increment it before using it")
        raise Wrong(f"some parameters are nan after step {bad + 1}, where the gradient is negative: v must "
                    "accumulate g² (grad * grad), so that √v̂ is real")
    for kind, says in SLIPS.items():
        if all(first_difference(g, s, ADAM_ATOL, 0) is None for g, s in zip(got, _slip(kind, start, grads, **hyper))):
            raise Wrong(says, f"hyper-parameters {hyper}")
    index, value, should = first_difference(got[bad], expected[bad], ADAM_ATOL, 0)
    raise Wrong(f"after step {bad + 1} the parameter is wrong at element {list(index)}: {value:.12g}, "
                f"torch.optim.Adam has {should:.12g}", f"hyper-parameters {hyper}; steps before it were right")


def _adam_trajectory(fn, start, grads, hyper: dict) -> list[torch.Tensor]:
    param, state, out = start.clone(), {}, []
    for step, grad in enumerate(grads):
        returned = call_student(fn, param, grad.clone(), state, **hyper)
        if step == 0 and torch.equal(param, start):
            also = (" (you returned a new tensor: write into param, e.g. param.sub_(...))"
                    if isinstance(returned, torch.Tensor) else "")
            raise Wrong(f"param did not change: update it in place, as an optimizer's step does{also}")
        out.append(param.clone())
    return out


def _seconds_per_step(step, numel: int = 100_000, repeats: int = 20) -> float:
    """Median seconds of one step on `numel` float32 numbers; `step(param, grad)` does it."""
    param, grad = torch.zeros(numel), torch.full((numel,), 0.01)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        step(param, grad)
        times.append(time.perf_counter() - begin)
    return sorted(times)[repeats // 2]


def _timings(fn) -> str:
    """One step on 100,000 float32 numbers, yours beside torch.optim.Adam's (median of 20)."""
    state, param = {}, torch.nn.Parameter(torch.zeros(100_000))
    builtin = torch.optim.Adam([param])

    def torch_step(_, grad):
        param.grad = grad
        builtin.step()

    with torch.no_grad():
        yours = _seconds_per_step(lambda p, g: fn(p, g, state))
        theirs = _seconds_per_step(torch_step)
    return f"yours {yours * 1e3:.2f} ms, torch.optim.Adam {theirs * 1e3:.2f} ms"


@exercise("06.adam_step", "Adam from its equations")
def adam_step(fn) -> Passed:
    start, grads = adam_inputs()
    worst = 0.0
    for hyper in ADAM_CASES:
        expected = torch_adam(start, grads, **hyper)
        with torch.no_grad():
            got = _adam_trajectory(fn, start, grads, hyper)
        if any(first_difference(g, e, ADAM_ATOL, 0) for g, e in zip(got, expected)):
            _explain_adam(got, expected, start, grads, hyper)
        worst = max(worst, max((g - e).abs().max().item() for g, e in zip(got, expected)))
    return Passed(f"{ADAM_STEPS} steps equal torch.optim.Adam to {ADAM_ATOL:g} in float64, for two sets of "
                  "hyper-parameters", {"largest |yours − torch.optim.Adam|": f"{worst:.1e}",
                                       "one step on 100,000 float32": _timings(fn)})


# -- ZeRO stage 1 on real ranks -----------------------------------------------------------------------

ZERO_NUMEL, ZERO_STEPS, ZERO_ATOL = 31, 4, 1e-9  # 31: no world size divides it, so the last shard is short
ZERO_HYPER = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-3}  # ε near √v: summing instead of averaging shows


def zero_start(numel: int = ZERO_NUMEL) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(60), dtype=torch.float64)


def rank_gradient(rank: int, step: int, numel: int = ZERO_NUMEL) -> torch.Tensor:
    """What rank `rank` computed on its own data at `step` (different on every rank)."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(numel, generator=generator, dtype=torch.float64) * 0.01


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor inside a state (dicts, lists and tuples searched)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x) for x in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x) for x in obj)
    return 0


def run_zero1(ctx, solution, numel: int = ZERO_NUMEL, steps: int = ZERO_STEPS, hyper: dict = ZERO_HYPER) -> dict:
    """On every rank: `steps` calls of the student's step on the shared flat parameters, its own gradients."""
    flat, state, history, returned = zero_start(numel).to(ctx.device), {}, [], None
    for step in range(steps):
        out = solution(ctx, flat, rank_gradient(ctx.rank, step, numel).to(ctx.device), state, **hyper)
        returned = out.detach().cpu().clone() if step == 0 and torch.is_tensor(out) else returned
        history.append(flat.detach().cpu().clone())
    return {"history": history, "state_bytes": _tensor_bytes(state), "returned": returned}


def _zero_candidates(n: int) -> dict[str, list[torch.Tensor]]:
    """The right trajectory (mean of the ranks' gradients) and the ones a slip gives."""
    per_rank = [[rank_gradient(r, s) for s in range(ZERO_STEPS)] for r in range(n)]
    mean = [torch.stack([per_rank[r][s] for r in range(n)]).mean(0) for s in range(ZERO_STEPS)]
    out = {"right": torch_adam(zero_start(), mean, **ZERO_HYPER),
           "summed": torch_adam(zero_start(), [g * n for g in mean], **ZERO_HYPER)}
    out.update({f"own {r}": torch_adam(zero_start(), per_rank[r], **ZERO_HYPER) for r in range(n)})
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.isclose(a, b, atol=ZERO_ATOL, rtol=0)


def _elements(mask: torch.Tensor) -> str:
    """'elements 8..30' for a contiguous run, else the first few indices."""
    indices = mask.nonzero().view(-1).tolist()
    if indices == list(range(indices[0], indices[-1] + 1)) and len(indices) > 2:
        return f"elements {indices[0]}..{indices[-1]}"
    return f"element{'s' * (len(indices) > 1)} {', '.join(map(str, indices[:8]))}{' …' * (len(indices) > 8)}"


def _explain_zero(results: list[dict], n: int, candidates: dict) -> None:
    """Raise Wrong at the first step and rank whose parameters differ from plain Adam's, naming the slip."""
    right = candidates["right"]
    for step in range(ZERO_STEPS):
        for rank, result in enumerate(results):
            got = result["history"][step]
            wrong = ~_close(got, right[step])
            if not wrong.any():
                continue
            before = results[rank]["history"][step - 1] if step else zero_start()
            where = f"rank {rank}, after step {step + 1}, {_elements(wrong)}"
            if step == 0 and torch.equal(got, before):
                returned = result["returned"] is not None and bool(_close(result["returned"], right[0]).all())
                raise Wrong("flat_param did not change" + (": you returned the right vector, but write it into "
                            "flat_param (flat_param.copy_(...)), where every rank's model reads it" if returned else
                            ": update it in place, then every rank must hold the whole updated vector"))
            if _close(got[wrong], before[wrong]).all():
                raise Wrong(f"the ranks disagree: {where} were not updated at that step. Only your own shard "
                            "changed: all-gather the updated shards so that every rank holds the whole new vector",
                            "ZeRO-1: each rank updates 1/N of the parameters, then one all-gather shares them")
            if _close(got[wrong], candidates["summed"][step][wrong]).all():
                raise Wrong(f"{where} followed Adam on the sum of the gradients: all-reduce adds, so divide by "
                            f"N = {n} to get the average (Adam's ε makes the scale matter)")
            own = [c[step] for name, c in candidates.items() if name.startswith("own")]
            if all(any(bool(_close(got[i], o[i])) for o in own) for i in wrong.nonzero().view(-1).tolist()):
                raise Wrong(f"{where} followed Adam on one rank's own gradient: average the gradients over the "
                            "ranks first (all-reduce, then divide by N), as data parallelism always does")
            index, value, should = first_difference(got, right[step], ZERO_ATOL, 0)
            raise Wrong(f"rank {rank}, after step {step + 1}: element {index[0]} is {value:.10g}; plain Adam on the "
                        f"averaged gradient has {should:.10g}")


def _explain_state(results: list[dict], n: int, element_size: int) -> None:
    share = 2 * math.ceil(ZERO_NUMEL / n) * element_size  # m and v of one shard
    whole = 2 * ZERO_NUMEL * element_size
    for rank, result in enumerate(results):
        held = result["state_bytes"]
        if held == 0:
            raise Wrong(f"rank {rank}'s state holds no tensor: keep m and v of your shard in `state` (a dict that "
                        "persists between steps), as the exercise asks")
        if held > share + 64:
            why = " — m and v of the whole vector: every rank updates everything" if held >= whole else ""
            raise Wrong(f"rank {rank} holds {held} bytes of optimizer state{why}. ZeRO-1 keeps only its own "
                        f"shard's m and v: 2·⌈P/N⌉ numbers = {share} bytes for P = {ZERO_NUMEL} on N = {n}")


@exercise("06.zero1_step", "A ZeRO-1 sharded Adam step on real ranks")
def zero1_step(fn) -> Passed:
    measured = {}
    for n in (4, 2):
        run = on_ranks(run_zero1, n, solution=fn)
        _explain_zero(run.results, n, _zero_candidates(n))
        _explain_state(run.results, n, element_size=8)
        held = [r["state_bytes"] for r in run.results]
        flat = torch.nn.Parameter(zero_start())
        whole = torch.optim.Adam([flat], **ZERO_HYPER)
        flat.grad = torch.zeros_like(flat)
        whole.step()
        measured[f"optimizer state per rank on {n} ranks"] = (
            f"yours {held} bytes; torch.optim.Adam {state_bytes(whole)}; distlab's ShardedAdam "
            f"{state_bytes(ShardedAdam([flat], None, 0, n))}")
    return Passed(f"on 4 and 2 ranks, after {ZERO_STEPS} steps every rank holds plain Adam's parameters on the "
                  f"averaged gradient (to {ZERO_ATOL:g}), each keeping only its 1/N shard of m and v", measured)
