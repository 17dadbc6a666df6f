"""Who talks to whom in decentralized training: graphs, their mixing matrices, and what the spectrum predicts.

A graph is a list of neighbour lists (node i talks to graph[i]). Gossip averages through a mixing
matrix W: x_i <- sum_j W_ij x_j. W is doubly stochastic, so the average of the replicas never moves,
and the distance of the replicas to it shrinks by at most the second-largest eigenvalue modulus of
W per step (Boyd, Ghosh, Prabhakar & Shah 2006; Xiao & Boyd 2004). Pure torch: ranks import this.
"""

from __future__ import annotations

import itertools
import math

import torch

from ..ranks import one_thread

TOPOLOGIES = ("ring", "torus", "full", "random", "exponential")


def torus_shape(n: int) -> tuple[int, int]:
    """The most square rows x cols = n (a prime n gives 1 x n, i.e. a ring)."""
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def _ring(n: int) -> list[set[int]]:
    return [{(i - 1) % n, (i + 1) % n} for i in range(n)]


def _torus(n: int) -> list[set[int]]:
    rows, cols = torus_shape(n)
    def at(r, c):
        return (r % rows) * cols + c % cols
    return [{at(i // cols + dr, i % cols + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))} for i in range(n)]


def _full(n: int) -> list[set[int]]:
    return [set(range(n)) for _ in range(n)]


def _exponential(n: int) -> list[set[int]]:
    """i talks to i +- 2^k (Ying et al. 2021 use the directed i -> i + 2^k; ours is its undirected twin)."""
    hops = [2**k for k in range(max(1, math.ceil(math.log2(n))))]
    return [{(i + s * h) % n for h in hops for s in (-1, 1)} for i in range(n)]


def _random(n: int, seed: int, p: float | None) -> list[set[int]]:
    """Erdos-Renyi G(n, p), drawn again (same seeded stream) until connected; p defaults to 2 ln(n) / n."""
    p = min(1.0, 2 * math.log(n) / n) if p is None else p
    gen = torch.Generator().manual_seed(seed)
    while True:
        upper = (torch.rand(n, n, generator=gen) < p).triu(1)  # the coin of edge i-j, i < j
        linked = upper | upper.T
        graph = [set(row.nonzero().flatten().tolist()) for row in linked]
        if is_connected(graph):
            return graph


def graph(topology: str, n: int, seed: int = 0, p: float | None = None) -> list[list[int]]:
    """Sorted neighbour lists of `topology` on n nodes (no self loops)."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if p is not None and not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    if n == 1:
        return [[]]
    build = {"ring": _ring, "torus": _torus, "full": _full, "exponential": _exponential}
    sets = _random(n, seed, p) if topology == "random" else build[topology](n)
    return [sorted(s - {i}) for i, s in enumerate(sets)]


def is_connected(graph: list, alive: list[int] | None = None) -> bool:
    """Whether every living node reaches every other through living nodes."""
    alive = set(range(len(graph)) if alive is None else alive)
    if not alive:
        return True
    seen, frontier = set(), [min(alive)]
    while frontier:
        node = frontier.pop()
        if node not in seen:
            seen.add(node)
            frontier.extend(j for j in graph[node] if j in alive)
    return seen == alive


def mixing_matrix(graph: list, alive: list[int] | None = None) -> torch.Tensor:
    """Metropolis-Hastings weights W_ij = 1 / (1 + max(d_i, d_j)) on the edges among living nodes.

    Symmetric and doubly stochastic on any undirected graph (Xiao, Boyd & Lall 2005); a dead node
    keeps weight 1 on itself and none on anyone else, so the living reweight among themselves.
    """
    n = len(graph)
    living = torch.zeros(n, dtype=torch.bool)
    living[list(range(n) if alive is None else alive)] = True
    rows = torch.arange(n).repeat_interleave(torch.tensor([len(neighbours) for neighbours in graph], dtype=torch.long))
    links = torch.zeros(n, n, dtype=torch.bool)
    links[rows, torch.tensor(list(itertools.chain.from_iterable(graph)), dtype=torch.long)] = True
    links &= living[:, None] & living[None, :]
    links.fill_diagonal_(False)  # a self-loop is not an edge
    degree = links.sum(1).double()
    w = torch.where(links, 1.0 / (1 + torch.maximum(degree[:, None], degree[None, :])), 0.0)
    return w + torch.diag(1.0 - w.sum(1))  # built as tensors: the complete graph on 1024 nodes in milliseconds


def slem(w: torch.Tensor) -> float:
    """Second-largest eigenvalue modulus: the factor by which gossip shrinks disagreement per step."""
    if len(w) < 2:
        return 0.0
    w = w.double()
    # Metropolis-Hastings weights are symmetric: eigvalsh is exact there, while the general eigvals
    # fails to converge on some LAPACK builds for the full graph (eigenvalue 0, n - 1 times)
    with one_thread():
        eigenvalues = torch.linalg.eigvalsh(w) if torch.equal(w, w.T) else torch.linalg.eigvals(w)
    return eigenvalues.abs().sort(descending=True).values[1].item()


def spectral_gap(w: torch.Tensor) -> float:
    """1 - slem(W): 0 never agrees, 1 agrees in one step (fully connected)."""
    return 1.0 - slem(w)


def random_matching(graph: list, gen: torch.Generator, alive: list[int] | None = None) -> list[int]:
    """Each node's partner for one round of pairwise gossip (-1: sits out): edges in random order, taken greedily."""
    n = len(graph)
    alive = set(range(n) if alive is None else alive)
    edges = [(i, j) for i in sorted(alive) for j in graph[i] if i < j and j in alive]
    partner = [-1] * n
    for k in torch.randperm(len(edges), generator=gen).tolist():
        i, j = edges[k]
        if partner[i] == partner[j] == -1:
            partner[i], partner[j] = j, i
    return partner


def pairwise_matrix(partner: list[int]) -> torch.Tensor:
    """Each matched pair replaces both values by their mean (Boyd et al. 2006): W_ii = W_ij = 1/2."""
    n = len(partner)
    w = torch.eye(n, dtype=torch.float64)
    for i, j in enumerate(partner):
        if j >= 0:
            w[i, i], w[i, j] = 0.5, 0.5
    return w


def consensus_distance(x: torch.Tensor) -> float:
    """Root-mean-square distance of the rows (replicas) of x to their average (Kong et al. 2021)."""
    return (x - x.mean(0)).pow(2).sum(1).mean().sqrt().item()


def simulate_gossip(w: torch.Tensor, steps: int, lr: float = 0.0, dim: int = 100, seed: int = 0) -> list[float]:
    """In-process, the mixing matrix alone: x <- W (x - lr * noise), noise standing in for each node's
    stochastic gradient. Returns the consensus distance after each step (index 0: the start).

    lr = 0: pure averaging from different starts. lr > 0: identical starts, and the drift that the
    gradients' disagreement builds up against the averaging that pulls it back.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(w)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) if lr == 0 else torch.zeros(n, dim, dtype=torch.float64)
    distances = [consensus_distance(x)]
    with one_thread():  # matrices this small: waking a thread pool costs more than the product
        for _ in range(steps):
            x = w @ (x - lr * torch.randn(n, dim, generator=gen, dtype=torch.float64))
            distances.append(consensus_distance(x))
    return distances
