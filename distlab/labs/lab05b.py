"""Lab 05b · Federated privacy and attacks: secure aggregation's pairwise masks, and Krum's scores.

Both in-process. The masks: every client's function runs with a `prg(seed, like)` the check provides and
watches, so it knows which seeds each client drew and, by least squares, with which sign each mask went
into the update; the masked updates must sum to the true sum exactly (the masks are fixed-point, so they
cancel in any order; the library's SecureAggregation goes further and works on integers mod R), each must
differ from its update, and a broken rule is named by pair (a mask with itself, a seed the pair does not
share, both clients adding, one seed for several pairs). Krum's scores are
compared with the library's `aggregation.krum_scores` on updates with attackers among them; a wrong
score is matched against the usual slips (the distance to itself, the neighbour count, unsquared distances).
"""

from __future__ import annotations

import itertools
import operator

import torch

from ..architectures.federated.aggregation import krum_scores as library_krum_scores
from ..architectures.federated.privacy import SecureAggregation
from .grading import Passed, Wrong, call_student, exercise, first_difference

# -- pairwise masks -----------------------------------------------------------------------------------

MASK_SCALE, FIXED_POINT = 10.0, 2 ** 10  # masks uniform in [-10, 10), in steps of 1/1024
MASK_CASES = ((5, 7), (2, 123))  # (clients, secret)
SHAPES = ((2, 3), (4,))


def prg(seed: int, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """A seed's mask, shaped like the update: fixed-point numbers, so masks cancel exactly in any order."""
    generator = torch.Generator().manual_seed(int(seed) % 2 ** 63)
    steps = int(MASK_SCALE * FIXED_POINT)
    return [torch.randint(-steps, steps, t.shape, generator=generator).to(t.dtype) / FIXED_POINT for t in like]


def mask_updates(num_clients: int, seed: int) -> list[list[torch.Tensor]]:
    """The clients' true updates (float64, fixed-point like the masks)."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randint(-2048, 2048, s, generator=generator).double() / FIXED_POINT for s in SHAPES]
            for _ in range(num_clients)]


class Watched:
    """The prg one client's function gets: it records every seed drawn and the mask it gave."""

    def __init__(self):
        self.draws: list[tuple[int, list[torch.Tensor]]] = []

    def __call__(self, seed, like):
        seed = operator.index(seed)  # an int (numpy's too); a float seed is a TypeError
        mask = prg(seed, like)
        self.draws.append((seed, [m.clone() for m in mask]))
        return mask


def _masked(fn, num_clients: int, secret: int) -> tuple[list, list, list[Watched]]:
    """Every client's masked update from the student's function, the true updates, and what each drew."""
    updates, sent, watched = mask_updates(num_clients, secret), [], []
    for client, update in enumerate(updates):
        given, seen = [t.clone() for t in update], Watched()
        got = call_student(fn, client, given, num_clients, secret, seen)
        if any(not torch.equal(g, t) for g, t in zip(given, update)):
            raise Wrong(f"client {client}'s function changed `update` in place: return a new list (start from "
                        "[t.clone() for t in update])")
        _check_shapes(got, update, client)
        sent.append(got)
        watched.append(seen)
    return updates, sent, watched


def _check_shapes(got, update, client: int) -> None:
    if not isinstance(got, (list, tuple)) or len(got) != len(update):
        raise Wrong(f"client {client} should return a list of {len(update)} tensors shaped like its update, got "
                    f"{type(got).__name__}")
    for i, (g, t) in enumerate(zip(got, update)):
        if not isinstance(g, torch.Tensor) or g.shape != t.shape:
            raise Wrong(f"client {client}'s layer {i} should be a tensor of shape {tuple(t.shape)}")


def _signs(sent, update, seen: Watched) -> dict[int, int]:
    """With which sign each seed's mask went into this client's masked update (least squares, rounded)."""
    if not seen.draws:
        return {}
    masks = torch.stack([torch.cat([m.flatten() for m in mask]) for _, mask in seen.draws], 1)
    residue = torch.cat([(s - t).flatten() for s, t in zip(sent, update)])
    weights = torch.linalg.lstsq(masks, residue.unsqueeze(1)).solution.flatten()
    signs: dict[int, int] = {}
    for (seed, _), w in zip(seen.draws, weights.tolist()):
        signs[seed] = signs.get(seed, 0) + round(w)
    return signs


def _check_pairs(updates, sent, watched: list[Watched], n: int) -> None:
    """Name the rule broken: a mask with itself, one seed for several pairs, a pair without a shared
    seed, both of a pair adding."""
    for client, seen in enumerate(watched):
        if not seen.draws:
            raise Wrong(f"client {client} drew no mask with prg: draw each pair's mask with prg(seed, update)")
        if len(seen.draws) > n - 1:
            raise Wrong(f"client {client} drew {len(seen.draws)} masks for its {n - 1} partners: it masked with "
                        "itself. Skip other == client (a self-mask never cancels: no one subtracts it)")
    users: dict[int, list[int]] = {}
    for client, seen in enumerate(watched):
        for seed in {s for s, _ in seen.draws}:
            users.setdefault(seed, []).append(client)
    crowded = next(((s, c) for s, c in users.items() if len(c) > 2), None)
    if crowded:
        raise Wrong(f"seed {crowded[0]} is used by clients {crowded[1]}: every pair needs its own seed, or a client "
                    "who knows its mask with one partner knows the others' masks too (e.g. seed = secret·N² + "
                    "min·N + max)")
    signs = [_signs(s, u, seen) for s, u, seen in zip(sent, updates, watched)]
    for i, j in itertools.combinations(range(n), 2):
        shared = set(signs[i]) & set(signs[j])
        if not shared:
            raise Wrong(f"clients {i} and {j} share no seed: client {i} drew {sorted(signs[i])}, client {j} drew "
                        f"{sorted(signs[j])}. The pair's seed must be the same whichever of them computes it: build "
                        "it from secret, min(i, j) and max(i, j), not from (client, other) in that order")
        seed = min(shared)
        a, b = signs[i][seed], signs[j][seed]
        if a == b != 0:
            verb = "added" if a > 0 else "subtracted"
            raise Wrong(f"clients {i} and {j} both {verb} their shared mask (seed {seed}), so it counts twice in the "
                        "sum instead of cancelling: the lower-numbered client adds it, the other subtracts it")
        if a + b != 0 or a == 0:
            raise Wrong(f"the mask clients {i} and {j} share (seed {seed}) went into client {i}'s update {a:+d} times "
                        f"and into client {j}'s {b:+d} times: the lower-numbered client adds it once, the other "
                        "subtracts it once")


def _sum(updates) -> list[torch.Tensor]:
    return [torch.stack(layer).sum(0) for layer in zip(*updates)]


def _check_sum(updates, sent, n: int) -> None:
    """The server's sum of the masked updates (no one dropped) must be the true sum."""
    total, truth = _sum(sent), _sum(updates)
    for layer, (got, should) in enumerate(zip(total, truth)):
        difference = first_difference(got, should, atol=0.0, rtol=0.0)
        if difference is not None:
            index, value, expected = difference
            raise Wrong(f"the masked updates of {n} clients do not sum to the true sum: layer {layer}, element "
                        f"{list(index)} sums to {value:.6g}, should be {expected:.6g}")


@exercise("05b.pairwise_masks", "Secure aggregation: pairwise masks that cancel in the sum")
def pairwise_masks(fn) -> Passed:
    for n, secret in MASK_CASES:
        updates, sent, watched = _masked(fn, n, secret)
        _check_pairs(updates, sent, watched, n)
        _check_sum(updates, sent, n)
        for client, (m, u) in enumerate(zip(sent, updates)):
            shift = max(float((s - t).abs().max()) for s, t in zip(m, u))
            if shift < 1.0:
                raise Wrong(f"client {client}'s masked update is within {shift:.3g} of its true update: the server "
                            "would read it. Add the masks to the update")
    n, secret = MASK_CASES[0]
    updates, sent, _ = _masked(fn, n, secret)
    library = SecureAggregation(n, seed=secret)
    library_sum = library.unmask_sum({k: library.mask(k, u) for k, u in enumerate(updates)})
    error = {name: max(float((a - b).abs().max()) for a, b in zip(got, _sum(updates)))
             for name, got in (("yours", _sum(sent)), ("library", library_sum))}
    return Passed(f"on {' and '.join(str(c) for c, _ in MASK_CASES)} clients the masked updates sum to the true sum "
                  "exactly; every pair shares its own seed, one adds and one subtracts; no update goes out in clear",
                  {"client 0's bias, true": [round(float(x), 3) for x in updates[0][1]],
                   "client 0's bias, as the server sees it": [round(float(x), 3) for x in sent[0][1]],
                   f"largest error of the sum, {n} clients": f"yours {error['yours']:.1e} (fixed-point masks), the "
                                                             f"library's SecureAggregation {error['library']:.1e} "
                                                             f"(integers mod 2^{library.bits}, quantum "
                                                             f"{library.quantum:.1e})"})


# -- Krum's scores ------------------------------------------------------------------------------------

KRUM_CASES = ((7, 2, 2), (10, 1, 1), (5, 0, 1))  # (clients, f, attackers among them)
DIM = 6


def krum_updates(n: int, attackers: int, seed: int) -> torch.Tensor:
    """[n, DIM] flattened updates: honest ones near a common direction, the last `attackers` sign-flipped x4."""
    generator = torch.Generator().manual_seed(seed)
    honest = torch.ones(DIM) + 0.3 * torch.randn(n, DIM, generator=generator)
    honest[n - attackers:] *= -4
    return honest


def _library_scores(updates: torch.Tensor, f: int) -> torch.Tensor:
    return library_krum_scores([([u], 1) for u in updates], f)


def _krum_slips(updates: torch.Tensor, f: int) -> dict[str, torch.Tensor]:
    """What the usual wrong scores give (only to name a mistake, never to grade)."""
    n = len(updates)
    closest = max(1, n - f - 2)
    squared = torch.cdist(updates.double(), updates.double()) ** 2
    plain = squared.sqrt().sort(dim=1).values
    slips = {"itself": squared.sort(dim=1).values[:, :closest].sum(1),
             "unsquared": plain[:, 1:closest + 1].sum(1)}
    for k in {n - f - 1, n - f, n - 1} - {closest}:
        if 1 <= k <= n - 1:
            slips[f"{k} neighbours"] = squared.sort(dim=1).values[:, 1:k + 1].sum(1)
    return slips


def _krum_message(slip: str, n: int, f: int) -> str:
    closest = max(1, n - f - 2)
    if slip == "itself":
        return (f"your scores count the update's distance to itself (0) among its {closest} nearest (or stop one "
                f"neighbour short): sort each row, skip column 0 (itself), sum the next n - f - 2 = {closest}")
    if slip == "unsquared":
        return "your scores add plain distances ‖u_i - u_j‖; Krum adds squared distances ‖u_i - u_j‖²"
    k = int(slip.split()[0])
    return f"your scores sum {k} neighbours; Krum sums the n - f - 2 = {n} - {f} - 2 = {closest} nearest others"


@exercise("05b.krum_scores", "Krum's score of every update")
def krum_scores(fn) -> Passed:
    for case, (n, f, attackers) in enumerate(KRUM_CASES):
        updates = krum_updates(n, attackers, seed=case)
        given = updates.clone()
        got = call_student(fn, given, f)
        if not torch.equal(given, updates):
            raise Wrong("your function changed `updates` in place: compute the distances into new tensors")
        expected = _library_scores(updates, f)
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise Wrong(f"return one score per update, a tensor of shape {tuple(expected.shape)}, got {shape}")
        if first_difference(got, expected, atol=1e-6, rtol=1e-4) is None:
            continue
        for slip, value in _krum_slips(updates, f).items():
            if first_difference(got, value, atol=1e-6, rtol=1e-4) is None:
                raise Wrong(_krum_message(slip, n, f), f"n = {n} updates, f = {f}")
        index, value, should = first_difference(got, expected, atol=1e-6, rtol=1e-4)
        raise Wrong(f"the score of update {index[0]} is {value:.6g}, should be {should:.6g} (n = {n}, f = {f})")
    n, f, attackers = KRUM_CASES[0]
    updates = krum_updates(n, attackers, seed=0)
    scores, kept = call_student(fn, updates.clone(), f), int(_library_scores(updates, f).argmin())
    return Passed(f"equal to aggregation.krum_scores for n = {', '.join(str(c[0]) for c in KRUM_CASES)} (f = 2, 1, 0)",
                  {f"scores, n = {n}, f = {f} (last {attackers} poisoned)": [round(float(s), 2) for s in scores],
                   "Krum keeps": f"update {int(scores.argmin())} by your scores, {kept} by the library's "
                                 f"({'honest' if kept < n - attackers else 'poisoned'})"})
