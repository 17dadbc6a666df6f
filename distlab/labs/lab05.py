"""Lab 05 · Federated learning: weighted FedAvg, and a Dirichlet label-skew partition.

Both are graded in-process (the server's arithmetic and the data split need no ranks). FedAvg runs on
updates from clients of very uneven sizes and is compared with the library's `aggregation.fedavg`; a
wrong average is matched against the usual slips (an unweighted mean, weights that do not sum to 1) and
the inputs must come back untouched. The partition is checked by its properties, since any random draw
is a valid answer: every index exactly once, no empty client, the same split for the same seed, and
label skew measured at α = 0.1, 1 and 1000 beside the library's `partition.dirichlet`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..architectures.federated import partition
from ..architectures.federated.aggregation import fedavg
from .grading import Passed, Wrong, call_student, exercise, first_difference

# -- weighted FedAvg ----------------------------------------------------------------------------------

FEDAVG_CASES = ((5, 50, 13, 1), (200, 3, 3), (7, 7, 7, 7, 7))  # examples per client: uneven first
LAYERS = ((3, 2), (2,))  # a weight and a bias


def client_results(sizes: tuple[int, ...], seed: int) -> list[tuple[list[torch.Tensor], int]]:
    """(update, num_examples) pairs, as clients send them: a list of layer tensors and an int count."""
    generator = torch.Generator().manual_seed(seed)
    return [([torch.randn(shape, generator=generator) for shape in LAYERS], n) for n in sizes]


def _copies(results) -> list[tuple[list[torch.Tensor], int]]:
    return [([t.clone() for t in update], n) for update, n in results]


def _slips(results) -> dict[str, list[torch.Tensor]]:
    """What the usual wrong averages give on these results (only to name a mistake, never to grade)."""
    layers = [torch.stack([u[i] for u, _ in results]).double() for i in range(len(LAYERS))]
    counts = torch.tensor([float(n) for _, n in results], dtype=torch.float64)
    weighted = [(counts.view(-1, *[1] * (x.dim() - 1)) * x).sum(0) for x in layers]
    return {
        "unweighted": [x.mean(0) for x in layers],
        "sum": [x.sum(0) for x in layers],
        "weighted sum": weighted,
        "weighted sum / clients": [w / len(results) for w in weighted],
    }


SLIP_MESSAGES = {
    "unweighted": "you averaged the updates equally: FedAvg weights client k by n_k / Σn (its share of all the "
                  "examples), so a client with 50 examples counts 50 times as much as one with 1",
    "sum": "you added the updates without weights or division: FedAvg is Σ (n_k / Σn) · update_k",
    "weighted sum": "you weighted by n_k but never divided: the weights must sum to 1, so divide by Σn "
                    "(the total number of examples)",
    "weighted sum / clients": "you divided Σ n_k · update_k by the number of clients: divide by the total number "
                              "of examples Σn, so that the weights n_k / Σn sum to 1",
}


def _same(got: list, expected: list[torch.Tensor]) -> bool:
    return all(first_difference(torch.as_tensor(g), e, atol=1e-5) is None for g, e in zip(got, expected))


def _check_average(got, results, case: int) -> None:
    """Raise Wrong unless `got` is the library's fedavg of `results`; name the slip when one matches."""
    expected = fedavg(results)
    if not isinstance(got, (list, tuple)) or len(got) != len(expected):
        raise Wrong(f"return a list of {len(expected)} tensors (one per layer, like each update), got "
                    f"{type(got).__name__}{f' of length {len(got)}' if isinstance(got, (list, tuple)) else ''}")
    for i, (g, e) in enumerate(zip(got, expected)):
        if not isinstance(g, torch.Tensor) or g.shape != e.shape:
            raise Wrong(f"layer {i} of your result should be a tensor of shape {tuple(e.shape)}, got "
                        f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}")
    if _same(got, expected):
        return
    sizes = [n for _, n in results]
    for slip, value in _slips(results).items():
        if _same(got, value):
            raise Wrong(SLIP_MESSAGES[slip], f"clients' example counts: {sizes}")
    layer = next(i for i, (g, e) in enumerate(zip(got, expected)) if first_difference(g, e, atol=1e-5))
    index, value, should = first_difference(got[layer], expected[layer], atol=1e-5)
    raise Wrong(f"layer {layer}, element {list(index)} is {value:.6g}, should be {should:.6g} "
                f"(clients' example counts {sizes}, case {case})")


def _check_untouched(results, before, case: int) -> None:
    for k, ((update, n), (original, n_before)) in enumerate(zip(results, before)):
        changed = [i for i, (t, o) in enumerate(zip(update, original)) if not torch.equal(t, o)]
        if changed or n != n_before:
            raise Wrong(f"your function changed client {k}'s update (layer {changed[0] if changed else '-'}) in "
                        "place: the server must leave the clients' updates as they came (compute into new "
                        "tensors, e.g. torch.zeros_like, or out-of-place `w * u` rather than `u *= w`)",
                        f"case {case}: clients' example counts {[m for _, m in before]}")


@exercise("05.weighted_fedavg", "FedAvg: the average weighted by each client's example count")
def weighted_fedavg(fn) -> Passed:
    for case, sizes in enumerate(FEDAVG_CASES):
        results = client_results(sizes, seed=case)
        before = _copies(results)
        got = call_student(fn, results)
        _check_untouched(results, before, case)
        _check_average(got, before, case)
    results = client_results(FEDAVG_CASES[0], seed=0)
    yours, library = call_student(fn, _copies(results)), fedavg(results)
    unweighted = _slips(results)["unweighted"]
    gap = max(float((torch.as_tensor(y).double() - e.double()).abs().max()) for y, e in zip(yours, library))
    away = max(float((e.double() - u).abs().max()) for e, u in zip(library, unweighted))
    return Passed(f"equal to the library's fedavg on {len(FEDAVG_CASES)} sets of clients (sizes {FEDAVG_CASES[0]} "
                  "and others), inputs untouched",
                  {"largest difference from aggregation.fedavg": f"{gap:.1e}",
                   "how far the weighted average is from the plain mean": f"{away:.3f} (the weights matter)",
                   "weight of the largest client": f"{max(FEDAVG_CASES[0]) / sum(FEDAVG_CASES[0]):.3f}"})


# -- a Dirichlet label-skew partition -----------------------------------------------------------------

CLASS_SIZES = (400, 300, 250, 200, 200, 200, 150, 150, 147, 3)  # 2,000 examples; one class rarer than the clients
CLIENTS, SEEDS = 10, (0, 1, 2)
SKEWED, UNIFORM = 0.45, 0.04  # mean label skew must be at least this at α = 0.1, at most this at α = 1000
ALPHAS = (0.1, 1.0, 1000.0)


def skewed_labels(seed: int = 5) -> torch.Tensor:
    """2,000 labels of 10 classes in uneven numbers (class 9 has only 3 examples), shuffled."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(CLASS_SIZES)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def label_skew(parts: list[torch.Tensor], labels: torch.Tensor) -> float:
    """Mean over clients of the total-variation distance between the client's label mix and the whole
    set's: 0 when every client holds the same mix, near 1 when each holds labels no one else has."""
    classes = int(labels.max()) + 1
    whole = torch.bincount(labels, minlength=classes).double() / len(labels)
    mixes = [torch.bincount(labels[p], minlength=classes).double() / len(p) for p in parts]
    return float(torch.stack([0.5 * (mix - whole).abs().sum() for mix in mixes]).mean())


def _as_parts(got, num_clients: int) -> list[torch.Tensor]:
    """The student's index lists as 1-D int64 tensors, or Wrong saying what the shape should be."""
    if not isinstance(got, (list, tuple)) or len(got) != num_clients:
        count = f" of length {len(got)}" if isinstance(got, (list, tuple)) else ""
        raise Wrong(f"return a list of {num_clients} index lists (one per client), got {type(got).__name__}{count}")
    parts = []
    for k, part in enumerate(got):
        tensor = torch.as_tensor(np.asarray(part) if not isinstance(part, torch.Tensor) else part)
        if tensor.dim() != 1 or (tensor.numel() and tensor.dtype.is_floating_point):
            raise Wrong(f"client {k}'s part should be a 1-D list of integer indices, got shape {tuple(tensor.shape)} "
                        f"and dtype {tensor.dtype}")
        parts.append(tensor.long())
    return parts


def _check_exactly_once(parts: list[torch.Tensor], labels: torch.Tensor, alpha: float) -> None:
    flat, n = torch.cat(parts), len(labels)
    outside = flat[(flat < 0) | (flat >= n)]
    if outside.numel():
        raise Wrong(f"index {int(outside[0])} is out of range: indices go from 0 to {n - 1} (α = {alpha})")
    seen = torch.bincount(flat, minlength=n)
    if bool((seen > 1).any()):
        index = int((seen > 1).nonzero()[0])
        holders = [k for k, p in enumerate(parts) for i in p.tolist() if i == index]
        raise Wrong(f"index {index} is given {int(seen[index])} times (to clients {holders}); "
                    f"{int((seen > 1).sum())} indices are repeated in all: each example belongs to exactly one "
                    "client (split each class's shuffled indices into consecutive pieces, don't sample with "
                    "replacement)", f"α = {alpha}")
    lost = (seen == 0).nonzero().flatten()
    if lost.numel():
        by_label = torch.bincount(labels[lost], minlength=int(labels.max()) + 1).tolist()
        raise Wrong(f"{lost.numel()} indices are given to no client (e.g. {lost[:5].tolist()}): every example "
                    "must go to some client. Rounding the proportions down loses the remainder of each class; "
                    "cut at the rounded cumulative sums instead (np.split at cumsum · size)",
                    f"lost per label: {by_label} (α = {alpha})")
    empty = [k for k, p in enumerate(parts) if p.numel() == 0]
    if empty:
        raise Wrong(f"client {empty[0]} holds no examples (α = {alpha}, {n} examples): a client without data "
                    "cannot train; redraw the proportions until every client has at least one example, as the "
                    "library does")


def _partition(fn, labels: torch.Tensor, alpha: float, seed: int) -> list[torch.Tensor]:
    """The student's partition of `labels` over CLIENTS, checked: every index once, no client empty."""
    parts = _as_parts(call_student(fn, labels.clone(), CLIENTS, alpha, seed), CLIENTS)
    _check_exactly_once(parts, labels, alpha)
    return parts


def _check_seeded(fn, labels: torch.Tensor) -> None:
    first, again = _partition(fn, labels, 0.5, 0), _partition(fn, labels, 0.5, 0)
    if any(not torch.equal(a.sort().values, b.sort().values) for a, b in zip(first, again)):
        raise Wrong("two calls with the same seed gave different partitions: draw every random number from a "
                    "generator made from `seed` (np.random.default_rng(seed) or a torch.Generator), not from the "
                    "global random state")
    other = _partition(fn, labels, 0.5, 1)
    if all(torch.equal(a.sort().values, b.sort().values) for a, b in zip(first, other)):
        raise Wrong("seeds 0 and 1 gave the same partition: the seed must change the draw")


def _check_skew(fn, labels: torch.Tensor) -> dict[float, float]:
    """Mean label skew over SEEDS at each α; Wrong when it does not fall from skewed to near-uniform."""
    skew, sizes = {}, []
    for alpha in ALPHAS:
        runs = [_partition(fn, labels, alpha, seed) for seed in SEEDS]
        skew[alpha] = sum(label_skew(parts, labels) for parts in runs) / len(runs)
        if alpha == ALPHAS[0]:
            sizes = [len(p) for p in runs[0]]
    low, high = skew[ALPHAS[0]], skew[ALPHAS[-1]]
    measured = f"label skew {low:.3f} at α = 0.1, {skew[1.0]:.3f} at α = 1, {high:.3f} at α = 1000"
    if abs(low - high) < 0.1:
        raise Wrong(f"the label skew is about the same at α = 0.1 and α = 1000 ({low:.3f} and {high:.3f}): is "
                    "`alpha` used? Draw each class's proportions from Dirichlet([alpha] * num_clients)", measured)
    if max(sizes) - min(sizes) <= 1:
        raise Wrong(f"at α = 0.1 every client holds the same number of examples ({sizes}): it looks like you drew "
                    "Dirichlet proportions per client (a label mix for each client, equal sizes). This lab uses the "
                    "library's convention, per class: each class's examples are split over the clients in "
                    "proportions p ~ Dirichlet(α · 1_K), so clients also differ in size", measured)
    if low < high:
        raise Wrong(f"the skew grows with α ({low:.3f} at 0.1, {high:.3f} at 1000); it should shrink: Dirichlet(α) "
                    "spreads evenly for large α and concentrates for small α. Pass [alpha] * num_clients, not 1/α",
                    measured)
    if low < SKEWED:
        raise Wrong(f"at α = 0.1 the clients' label mixes are too alike (skew {low:.3f}, should be at least "
                    f"{SKEWED}: the library's split gives about 0.65)", measured)
    if high > UNIFORM:
        raise Wrong(f"at α = 1000 the clients' label mixes should be nearly the whole set's (skew at most {UNIFORM}; "
                    f"the library's split gives about 0.013), yours {high:.3f}: with per-class proportions near 1/K "
                    "each class is split almost evenly", measured)
    return skew


@exercise("05.dirichlet_partition", "A Dirichlet(α) label-skew partition")
def dirichlet_partition(fn) -> Passed:
    labels = skewed_labels()
    given = labels.clone()
    _partition(fn, labels, 0.5, 0)
    if not torch.equal(labels, given):
        raise Wrong("your function changed `labels`: leave them as they came (shuffle a copy of each class's indices)")
    for seed in range(5):  # 40 examples over 10 clients: some draws leave a client empty
        _partition(fn, torch.arange(40) % 2, 0.5, seed)
    _check_seeded(fn, labels)
    yours = _check_skew(fn, labels)
    library = {alpha: sum(label_skew(partition.dirichlet(labels, CLIENTS, alpha, seed), labels) for seed in SEEDS)
               / len(SEEDS) for alpha in ALPHAS}
    return Passed(f"every index exactly once, no empty client, seeded; label skew falls from ≥ {SKEWED} at α = 0.1 "
                  f"to ≤ {UNIFORM} at α = 1000 (2,000 labels, {CLIENTS} clients, mean over {len(SEEDS)} seeds)",
                  {f"label skew at α = {alpha:g}": f"yours {yours[alpha]:.3f}, partition.dirichlet {library[alpha]:.3f}"
                   for alpha in ALPHAS})
