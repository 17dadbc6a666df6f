"""Lab 04 · Decentralized gossip: Metropolis–Hastings weights for any graph, and one D-PSGD step on real ranks.

The mixing matrix is graded in-process against `topology.mixing_matrix` on eight graphs (ring, star,
torus, random, complete, an irregular one, a single node, one whose lists name a node itself), with
the mistake named when the matrix is not symmetric, a row does not sum to 1 or a self-loop was taken
for an edge. The D-PSGD step runs on 4 real ranks for a ring, the complete graph and a star, with
ctx.comm limited to send/recv/isend/irecv: the result must equal the library's own step
(`gossip.exchange` + `gossip.mix`, i.e. W @ (X − lr·G)), every rank must talk to its neighbours only,
once each, and send deg × S bytes.
"""

from __future__ import annotations

import torch

from .. import audit
from ..architectures import gossip
from ..architectures import topology as topo
from .grading import Passed, Wrong, call_student, exercise, first_difference, on_ranks, point_to_point_only

GRAPHS = {
    "ring of 6": topo.graph("ring", 6),
    "star of 6 (node 0 the hub)": [[1, 2, 3, 4, 5], [0], [0], [0], [0], [0]],
    "3x3 torus": topo.graph("torus", 9),
    "random graph of 8": topo.graph("random", 8, seed=1),
    "complete graph of 5": topo.graph("full", 5),
    "triangle with a tail": [[1, 2], [0, 2, 3], [0, 1], [1, 4], [3]],
    "single node": [[]],
    "triangle with a tail, node 3 listing itself": [[1, 2], [0, 2, 3], [0, 1], [1, 3, 4], [3]],
}
STEP_GRAPHS = {"ring": topo.graph("ring", 4), "complete graph": topo.graph("full", 4),
               "star (rank 0 the hub)": [[1, 2, 3], [0], [0], [0]]}
LR, NUMEL = 0.1, 37
HINT = "D-PSGD is decentralized: each rank exchanges with its neighbours only, point to point."


def without_self_loops(graph: list) -> list[list[int]]:
    return [sorted(set(neighbours) - {i}) for i, neighbours in enumerate(graph)]


# -- Metropolis-Hastings weights ----------------------------------------------------------------------

def _as_matrix(got, n: int, name: str) -> torch.Tensor:
    try:
        matrix = got.detach().cpu().double() if isinstance(got, torch.Tensor) else \
            torch.tensor(got, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise Wrong(f"{name}: return W as an n x n tensor, got {type(got).__name__}") from None
    if matrix.shape != (n, n):
        raise Wrong(f"{name}: W has shape {tuple(matrix.shape)}, expected ({n}, {n}) for {n} node(s)")
    return matrix


def _explain_weights(m: torch.Tensor, expected: torch.Tensor, graph: list, name: str) -> None:
    """Raise Wrong naming the first property of Metropolis-Hastings weights that `m` breaks."""
    links, n = without_self_loops(graph), len(graph)
    degree = [len(nb) for nb in links]
    for i in range(n):
        for j in range(n):
            if i != j and j not in links[i] and abs(float(m[i, j])) > 1e-12:
                raise Wrong(f"{name}: W[{i},{j}] = {float(m[i, j]):.4g}, but {i} and {j} are not neighbours: a node "
                            "mixes only with its neighbours (W_ij = 0 off the edges)")
    loops = [i for i, nb in enumerate(graph) if i in nb]
    if loops:
        raise Wrong(f"{name}: node {loops[0]} lists itself as a neighbour, and a self-loop is not an edge: skip j == i "
                    "(and do not count it in the degree)", _first_difference(m, expected))
    if not torch.allclose(m, m.T, atol=1e-9):
        own = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            own[i, links[i]] = 1.0 / (1 + degree[i])
            own[i, i] = 1.0 - own[i].sum()
        i, j = ((m - m.T).abs() > 1e-9).nonzero()[0].tolist()
        if torch.allclose(m, own, atol=1e-9):
            raise Wrong(f"{name}: you used 1 / (1 + d_i), the node's own degree only: then W[{i},{j}] = "
                        f"{float(m[i, j]):.4g} but W[{j},{i}] = {float(m[j, i]):.4g} (d_{i} = {degree[i]}, d_{j} = "
                        f"{degree[j]}), the columns do not sum to 1 and gossip moves the average. Use max(d_i, d_j)")
        raise Wrong(f"{name}: W is not symmetric: W[{i},{j}] = {float(m[i, j]):.4g} but W[{j},{i}] = "
                    f"{float(m[j, i]):.4g}; both ends of an edge must use the same weight, 1 / (1 + max(d_i, d_j))")
    rows = m.sum(1)
    if not torch.allclose(rows, torch.ones(n, dtype=torch.float64), atol=1e-9):
        i = int((rows - 1).abs().argmax())
        if n > 1 and torch.all(m.diagonal().abs() < 1e-12):
            raise Wrong(f"{name}: the rows do not sum to 1 (row {i}: {float(rows[i]):.4g}) and the diagonal is all 0: "
                        "what is left of each row belongs on the diagonal, W_ii = 1 − Σ_j≠i W_ij")
        raise Wrong(f"{name}: row {i} sums to {float(rows[i]):.4g}, not 1: set W_ii = 1 − Σ_j≠i W_ij")
    for i in range(n):
        for j in links[i]:
            _explain_edge(float(m[i, j]), float(expected[i, j]), i, j, degree, name)
    raise Wrong(f"{name}: W is wrong", _first_difference(m, expected))


def _explain_edge(got: float, should: float, i: int, j: int, degree: list[int], name: str) -> None:
    if abs(got - should) < 1e-9:
        return
    biggest = max(degree[i], degree[j])
    what = f"{name}: W[{i},{j}] = {got:.4g} on the edge {i}–{j} (d_{i} = {degree[i]}, d_{j} = {degree[j]})"
    if abs(got - 1 / biggest) < 1e-9:
        raise Wrong(f"{what}: that is 1 / max(d_i, d_j); Metropolis–Hastings is 1 / (1 + max(d_i, d_j)) = "
                    f"{should:.4g}, which leaves a positive weight on the diagonal")
    if abs(got - 1 / (2 + biggest)) < 1e-9:
        raise Wrong(f"{what}: that is 1 / (2 + max(d_i, d_j)): you counted the node itself in its degree")
    raise Wrong(f"{what}, should be 1 / (1 + max(d_i, d_j)) = {should:.4g}")


def _first_difference(m: torch.Tensor, expected: torch.Tensor) -> str:
    index, got, should = first_difference(m, expected, atol=1e-9)
    return f"W[{index[0]},{index[1]}] is {got:.4g}, should be {should:.4g}"


@exercise("04.metropolis_hastings", "Metropolis–Hastings weights for any graph")
def metropolis_hastings(fn) -> Passed:
    gaps = {}
    for name, graph in GRAPHS.items():
        expected = topo.mixing_matrix(without_self_loops(graph))
        m = _as_matrix(call_student(fn, [list(nb) for nb in graph]), len(graph), name)
        if not torch.allclose(m, expected, atol=1e-9):
            _explain_weights(m, expected, graph, name)
        gaps[name] = topo.spectral_gap(m)
    shown = ", ".join(f"{name} {gap:.3f}" for name, gap in list(gaps.items())[:5])
    return Passed(f"equal to topology.mixing_matrix on {len(GRAPHS)} graphs: symmetric, doubly stochastic, weight only "
                  "on edges, self-loops ignored", {"spectral gap of your W": shown})


# -- one D-PSGD step on real ranks ----------------------------------------------------------------------

def run_step(ctx, solution, graphs: dict = STEP_GRAPHS) -> list[dict]:
    """On every rank, for each graph: the library's step (exchange + mix), then the student's, under the
    p2p-only rules, from the same parameters and gradient."""
    outcomes = []
    for graph in graphs.values():
        w = topo.mixing_matrix(graph)
        gen = torch.Generator().manual_seed(100 + ctx.rank)
        x, grad = torch.randn(NUMEL, generator=gen).to(ctx.device), torch.randn(NUMEL, generator=gen).to(ctx.device)
        local = x - LR * grad
        peers = [j for j in range(ctx.world_size) if j != ctx.rank and w[ctx.rank, j] > 0]
        expected = gossip.mix(ctx.rank, local, gossip.exchange(local, peers), w)
        with point_to_point_only(ctx, HINT) as (student_ctx, transfers):
            got = solution(student_ctx, x.clone(), grad.clone(), w.clone(), LR)
        is_tensor = isinstance(got, torch.Tensor)
        outcomes.append({"x": x.cpu(), "grad": grad.cpu(), "expected": expected.cpu(), "peers": peers,
                         "got": got.detach().cpu() if is_tensor else got,
                         "device": str(got.device) if is_tensor else None, "rank_device": str(ctx.device),
                         "on_device": is_tensor and audit.same_device(got.device, ctx.device),
                         "transfers": list(transfers)})
    return outcomes


def _explain_talk(outcomes: list[dict], name: str, case: int, numel: int) -> None:
    for rank, o in enumerate(outcomes):
        result = o[case]
        for kind, field, verb in (("send", "dst", "sent to"), ("recv", "src", "received from")):
            talked = [t[field] for t in result["transfers"] if t["kind"] == kind]
            strangers = sorted(set(talked) - set(result["peers"]))
            if strangers:
                raise Wrong(f"{name}: rank {rank} {verb} rank {strangers[0]}, which is not its neighbour (W[{rank},"
                            f"{strangers[0]}] = 0): a rank talks only to its neighbours {result['peers']}")
            missed = sorted(set(result["peers"]) - set(talked))
            if missed:
                raise Wrong(f"{name}: rank {rank} never {verb} its neighbour {missed[0]}: every neighbour sends its "
                            "x − lr·g and receives yours, once per step")
            twice = sorted({j for j in talked if talked.count(j) > 1})
            if twice:
                raise Wrong(f"{name}: rank {rank} {verb} rank {twice[0]} {talked.count(twice[0])} times: once per "
                            "neighbour per step is all D-PSGD needs")
        sent = sum(t["bytes"] for t in result["transfers"] if t["kind"] == "send")
        model = len(result["peers"]) * numel * 4
        if sent != model:
            raise Wrong(f"{name}: rank {rank} sent {sent} bytes; one D-PSGD step sends the float32 parameter vector "
                        f"once to each of its {len(result['peers'])} neighbour(s): {model} bytes")


def _mistakes(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, i: int, graph: list) -> list[tuple]:
    """Rank i's result after the usual mistakes, with what to say."""
    y, others = x - LR * g, [j for j in range(len(w)) if j != i]
    around = [i, *graph[i]]
    theirs = sum(w[i, j] * y[j] for j in others)
    return [
        ((w @ x)[i] - LR * g[i], "you mixed first and stepped after (W·x − lr·g, Lian et al.'s order); this exercise, "
                                 "like gossip.train, steps first, then mixes: x_i ← Σ_j W_ij (x_j − lr·g_j)"),
        ((w @ x)[i], "the gradient step is missing: take x − lr·grad first, then mix"),
        (y[i], "you did not mix: after the step, average with the neighbours through W"),
        (theirs, "your own term is missing: add W_ii·(x_i − lr·g_i), your own weight on your own parameters"),
        (y[i] + theirs, "your own parameters must be weighted too: W_ii·(x_i − lr·g_i), not (x_i − lr·g_i)"),
        (w[i, i] * y[i] + sum(w[i, j] * x[j] for j in others),
         "you sent your parameters from before the step: send x − lr·grad, so the neighbours mix the stepped values"),
        (y[around].mean(0), "you averaged uniformly over yourself and your neighbours: use W's weights (they differ "
                            "where degrees differ)"),
        ((w @ (x + LR * g))[i], "you added the gradient: the SGD step is x − lr·grad"),
    ]


def _explain_values(outcomes: list[dict], name: str, case: int, graph: list) -> None:
    x = torch.stack([o[case]["x"] for o in outcomes]).double()
    g = torch.stack([o[case]["grad"] for o in outcomes]).double()
    w = topo.mixing_matrix(graph)
    for rank, o in enumerate(outcomes):
        got, expected = o[case]["got"], o[case]["expected"]
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            raise Wrong(f"{name}: rank {rank} returned {type(got).__name__} "
                        f"{tuple(got.shape) if isinstance(got, torch.Tensor) else ''}: return the new parameters, "
                        f"a tensor of shape {tuple(expected.shape)}")
        if not o[case]["on_device"]:
            raise Wrong(f"{name}: rank {rank} returned a tensor on {o[case]['device']}; keep it on ctx.device "
                        f"({o[case]['rank_device']})")
        difference = first_difference(got, expected)
        if difference is None:
            continue
        for value, why in _mistakes(x, g, w, rank, graph):
            matches = torch.allclose(got.double(), value, atol=1e-5)
            if matches and not torch.allclose(value, expected.double(), atol=1e-5):
                raise Wrong(f"{name}: rank {rank}: {why}")
        index, value, should = difference
        raise Wrong(f"{name}: rank {rank}'s new parameters are wrong at element {index[0]}: {value:.6g}, should be "
                    f"{should:.6g} = Σ_j W_{rank}j (x_j − lr·g_j)")


@exercise("04.dpsgd_step", "One D-PSGD step: a local SGD step, then mixing with the neighbours")
def dpsgd_step(fn) -> Passed:
    outcomes = on_ranks(run_step, 4, solution=fn).results
    measured = {}
    for case, (name, graph) in enumerate(STEP_GRAPHS.items()):
        _explain_talk(outcomes, name, case, NUMEL)
        _explain_values(outcomes, name, case, graph)
        stepped = torch.stack([o[case]["x"] - LR * o[case]["grad"] for o in outcomes])
        mixed = torch.stack([o[case]["got"] for o in outcomes])
        sent = [sum(t["bytes"] for t in o[case]["transfers"] if t["kind"] == "send") for o in outcomes]
        measured[name] = (f"consensus distance {topo.consensus_distance(stepped):.3f} → "
                          f"{topo.consensus_distance(mixed):.3f}, bytes sent per rank {sent}")
    return Passed("equal to the library's step (W·(X − lr·G)) on 4 ranks for the ring, the complete graph and a star; "
                  f"neighbours only, once each, deg × S bytes (S = {NUMEL * 4})", measured)
