"""Gossip: mixing matrices, consensus at the rate the spectrum predicts, D-PSGD against all-reduce,
node dropout, the hybrid coordinator. Real gloo ranks where ranks are involved."""

import pytest
import torch
from torch.nn.utils import parameters_to_vector

import distlab as dl
from distlab.architectures import coordinated as hybrid
from distlab.architectures import gossip
from distlab.architectures import topology as topo

PARAMS = 64 * 32 + 32 + 32 * 10 + 10  # dl.models.mlp(64, 32, 10)
PAYLOAD = 4 * PARAMS  # float32 bytes of one replica


def consensus_by_step(run, rank=0):
    rows = run.metrics[run.metrics["rank"] == rank]
    return rows.set_index("step")["consensus"]


def start_params(rank: int, seed: int = 0) -> torch.Tensor:
    """What gossip.train(same_start=False) starts rank `rank` from."""
    torch.manual_seed(seed + 1 + rank)
    return parameters_to_vector(dl.models.mlp(64, 32, 10).parameters()).detach()


# -- the graphs and their mixing matrices (in-process) --------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 9, 16, 33])
@pytest.mark.parametrize("topology", topo.TOPOLOGIES)
def test_mixing_matrix_is_symmetric_doubly_stochastic_on_the_graph_edges(topology, n):
    graph = topo.graph(topology, n, seed=n)
    one = torch.ones(n, dtype=torch.float64)
    for alive in (None, list(range(1, n))):  # everyone, and without node 0 (the living reweight)
        w = topo.mixing_matrix(graph, alive)
        assert torch.allclose(w.sum(0), one) and torch.allclose(w.sum(1), one)
        assert (w >= 0).all() and torch.equal(w, w.T)
        edges = {(i, j) for i in range(n) for j in graph[i] if alive is None or (i in alive and j in alive)}
        assert {(i, j) for i in range(n) for j in range(n) if i != j and w[i, j] > 0} == edges
    assert topo.is_connected(graph)


def test_graph_degrees_and_seeded_random_graph():
    degrees = {t: {len(nb) for nb in topo.graph(t, 16)} for t in topo.TOPOLOGIES if t != "random"}
    assert degrees == {"ring": {2}, "torus": {4}, "full": {15}, "exponential": {7}}  # +-1, +-2, +-4, 8
    assert topo.torus_shape(12) == (3, 4) and topo.torus_shape(7) == (1, 7)
    assert topo.graph("random", 16, seed=1) == topo.graph("random", 16, seed=1) != topo.graph("random", 16, seed=2)
    with pytest.raises(ValueError, match="topology must be one of"):
        topo.graph("star", 4)
    with pytest.raises(ValueError, match="n must be at least 1"):
        topo.graph("ring", 0)


def test_pairwise_gossip_pairs_neighbours_and_averages_them():
    graph = topo.graph("torus", 16)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        partner = topo.random_matching(graph, gen, alive=list(range(15)))
        assert partner[15] == -1
        for i, j in enumerate(partner):
            assert j == -1 or (partner[j] == i and j in graph[i])
        w = topo.pairwise_matrix(partner)
        assert torch.allclose(w.sum(0), torch.ones(16, dtype=torch.float64)) and torch.equal(w, w.T)
        assert torch.allclose(w @ w, w)  # averaging a pair twice changes nothing: a projection


def test_options_that_cannot_run_are_refused_before_anything_is_sent():
    ring = topo.graph("ring", 4)
    gossip.check_options(ring, "dpsgd", 10, 1, {3: 5})  # one node off a ring leaves a path: fine
    with pytest.raises(ValueError, match="algorithm must be one of"):
        gossip.check_options(ring, "push-sum", 10, 1, {})
    with pytest.raises(ValueError, match="mix_every must be at least 1"):
        gossip.check_options(ring, "dpsgd", 10, 0, {})
    with pytest.raises(ValueError, match="leave must map ranks"):
        gossip.check_options(ring, "dpsgd", 10, 1, {4: 5})
    with pytest.raises(ValueError, match="without a connected graph"):  # 0 and 2 gone: 1 and 3 cut apart
        gossip.check_options(ring, "dpsgd", 10, 1, {0: 5, 2: 5})


@pytest.mark.parametrize("n", [16, 64])
def test_drift_shrinks_as_the_graph_gets_denser_in_process(n):
    """The claim notebook 04 teaches, from the mixing matrix alone: ring (degree 2), torus (4),
    exponential (2 log2 n - 1), full (n - 1): larger spectral gap, faster averaging, less drift."""
    order = ["ring", "torus", "exponential", "full"]
    w = {t: topo.mixing_matrix(topo.graph(t, n)) for t in order}
    gaps = [topo.spectral_gap(w[t]) for t in order]
    assert gaps == sorted(gaps) and gaps[0] < 0.1 and gaps[-1] == pytest.approx(1.0)
    drift = [sum(topo.simulate_gossip(w[t], 300, lr=0.1)[100:]) / 200 for t in order]
    assert all(a > 1.2 * b for a, b in zip(drift, drift[1:-1])) and drift[-1] < 1e-9
    for t in ("torus", "exponential"):  # with lr = 0, distance shrinks by slem per step once settled
        d = topo.simulate_gossip(w[t], 30)  # (by step 50, float64 round-off is all that is left)
        assert (d[30] / d[20]) ** (1 / 10) == pytest.approx(topo.slem(w[t]), abs=0.01)


# -- real ranks --------------------------------------------------------------------------------------

def assert_average_kept(run):
    start_mean = torch.stack([start_params(r) for r in range(4)]).mean(0)
    end_mean = torch.stack([r["params"] for r in run.results]).mean(0)
    assert torch.allclose(end_mean, start_mean, atol=1e-6)


@pytest.mark.timeout(120)
def sent_as_counted(run) -> list[int]:
    """Bytes each rank really sent in gossip's isend calls, from the run's comm table (not the formula)."""
    comm = run.comm
    sends = comm[(comm["op"] == "send") & (comm["tag"] == "train")]
    return [int(sends[sends["rank"] == r]["bytes"].sum()) for r in range(run.world_size)]


@pytest.mark.parametrize("topology", ["ring", "random", "full"])
def test_consensus_decays_at_the_rate_the_spectral_gap_predicts(topology):
    """lr = 0, different starts: pure gossip averaging on 4 gloo ranks. The distance to the average
    shrinks by slem(W) per step, and the average itself never moves (W is doubly stochastic)."""
    run = dl.launch(gossip.train, world_size=4, timeout=100, topology=topology, steps=12, lr=0.0, same_start=False)
    xi = consensus_by_step(run)
    rate = topo.slem(topo.mixing_matrix(topo.graph(topology, 4)))
    if topology == "full":
        assert rate < 1e-12 and xi[1] < 1e-6 * xi[0]  # everyone averages with everyone: one step
    else:
        assert (xi[12] / xi[4]) ** (1 / 8) == pytest.approx(rate, abs=0.01)
        assert all(xi[t + 1] <= (rate + 0.01) * xi[t] for t in range(12))
    assert xi[0] > 1.0
    assert_average_kept(run)
    assert all(r["sent_bytes"] == 12 * len(topo.graph(topology, 4)[i]) * PAYLOAD for i, r in enumerate(run.results))
    assert sent_as_counted(run) == [12 * len(topo.graph(topology, 4)[i]) * PAYLOAD for i in range(4)]


@pytest.mark.timeout(120)
def test_randomized_pairwise_gossip_keeps_the_average_and_reaches_consensus():
    """On a 4-ring every round is one of the two perfect matchings; two different ones in a row
    average everyone, so Ξ never grows, reaches round-off, and each round every rank sends once."""
    run = dl.launch(gossip.train, world_size=4, timeout=100, algorithm="pairwise", topology="ring", steps=12,
                    lr=0.0, same_start=False)
    xi = consensus_by_step(run)
    assert all(xi[t + 1] <= xi[t] * (1 + 1e-6) for t in range(12)) and xi[12] < 1e-6 * xi[0]
    assert_average_kept(run)
    assert [r["sent_bytes"] for r in run.results] == [12 * PAYLOAD] * 4
    assert sent_as_counted(run) == [12 * PAYLOAD] * 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same task (4 ranks, 100 steps, same start) under each algorithm, launched once for the tests below."""
    configs = {"ring": {"topology": "ring"}, "full": {"topology": "full"},
               "ring, mix every 4": {"topology": "ring", "mix_every": 4},
               "pairwise": {"algorithm": "pairwise", "topology": "ring"}, "all-reduce": {"algorithm": "allreduce"}}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DISTLAB_RUNS", str(tmp_path_factory.mktemp("runs")))
        return {name: dl.launch(gossip.train, world_size=4, timeout=100, steps=100, **kw)
                for name, kw in configs.items()}


@pytest.mark.timeout(200)
def test_gossip_on_a_fully_connected_graph_is_data_parallel_sgd(trained):
    """Two versions of one idea: mixing with W = 1/N after the local step equals averaging the gradients."""
    for full, reduced in zip(trained["full"].results, trained["all-reduce"].results):
        assert torch.allclose(full["params"], reduced["params"], atol=1e-5)
        assert full["accuracy"] == pytest.approx(reduced["accuracy"], abs=1e-6)
    assert consensus_by_step(trained["all-reduce"]).max() < 1e-6


@pytest.mark.timeout(200)
def test_bytes_sent_per_rank_match_the_algorithm(trained):
    sent = {name: [r["sent_bytes"] for r in run.results] for name, run in trained.items()}
    assert sent["ring"] == [100 * 2 * PAYLOAD] * 4  # two neighbours, every step
    assert sent["full"] == [100 * 3 * PAYLOAD] * 4
    assert sent["ring, mix every 4"] == [25 * 2 * PAYLOAD] * 4
    assert sent["all-reduce"] == [100 * round(2 * 3 / 4 * PAYLOAD)] * 4  # the ring all-reduce's 2(N-1)/N
    assert sent["pairwise"] == [100 * PAYLOAD] * 4  # on a 4-ring a greedy matching pairs everyone
    comm = trained["all-reduce"].comm
    assert comm.groupby("rank")["bytes"].sum().tolist() == [100 * PAYLOAD] * 4  # the payload, counted by ctx.comm
    for name in ("ring", "full", "pairwise", "ring, mix every 4"):
        per_step = trained[name].metrics.dropna(subset=["loss"]).groupby("rank")["sent_bytes"].sum()
        assert per_step.tolist() == sent[name]
        assert sent_as_counted(trained[name]) == sent[name]  # the transfers themselves, counted by ctx.comm


@pytest.mark.timeout(200)
def test_drift_shrinks_as_the_graph_gets_denser_on_real_ranks(trained):
    """Mean consensus distance over training: mixing every 4th step > pairwise (one partner) > ring
    (two neighbours) > fully connected (which stays in consensus, as all-reduce does)."""
    mean = {name: consensus_by_step(run).iloc[1:].mean() for name, run in trained.items()}
    assert mean["ring, mix every 4"] > 1.2 * mean["pairwise"] > 1.2 * 1.2 * mean["ring"]
    assert mean["ring"] > 1000 * mean["full"]
    assert all(r["accuracy"] > 0.6 for run in trained.values() for r in run.results)


@pytest.mark.timeout(120)
def test_survivors_reach_consensus_after_a_node_leaves():
    """Rank 3 leaves before step 5; the ring becomes the path 0-1-2, whose reweighted W (Metropolis)
    still averages: the survivors agree, at the path's rate, on the average they held when it left."""
    run = dl.launch(gossip.train, world_size=4, timeout=100, topology="ring", steps=40, lr=0.0,
                    same_start=False, leave={3: 5})
    assert [r["steps"] for r in run.results] == [40, 40, 40, 4]
    alive = run.metrics.dropna(subset=["loss"]).groupby("step")["alive"].agg(["min", "max", "count"])
    assert (alive.loc[1:4] == [4, 4, 4]).all().all() and (alive.loc[5:] == [3, 3, 3]).all().all()
    xi = consensus_by_step(run)
    path = topo.mixing_matrix(topo.graph("ring", 4), alive=[0, 1, 2])[:3, :3]
    assert (xi[30] / xi[10]) ** (1 / 20) == pytest.approx(topo.slem(path), abs=0.01)  # 2/3
    assert xi[40] < 1e-4 * xi[5]
    survivors = torch.stack([r["params"] for r in run.results[:3]])
    assert torch.allclose(survivors, survivors.mean(0).expand_as(survivors), atol=1e-4)
    # Before step 5 all four mixed; from step 5 the survivors' mean is fixed: it is the mean they reach.
    ring = topo.mixing_matrix(topo.graph("ring", 4)).float()
    held = torch.linalg.matrix_power(ring, 4) @ torch.stack([start_params(r) for r in range(4)])
    assert torch.allclose(survivors.mean(0), held[:3].mean(0), atol=1e-5)


@pytest.mark.timeout(120)
def test_hybrid_coordinator_sends_only_control_and_workers_swap_parameters():
    run = dl.launch(hybrid.train, world_size=4, timeout=100, rounds=15, local_steps=5)
    plan, workers = run.results[0], run.results[1:]
    assert sorted(plan["shards"].values()) == [0, 1, 2]
    assert [w["shard"] for w in workers] == [plan["shards"][r] for r in (1, 2, 3)]
    comm = run.comm
    coordinator = comm[comm["rank"] == 0]
    assert set(coordinator["tag"]) == {"control"} and coordinator["bytes"].max() <= 16
    assert coordinator.groupby("op")["bytes"].sum().to_dict() == {"send": 3 * 16 + 15 * 3 * 8, "recv": 15 * 3 * 4}
    for rank in (1, 2, 3):
        rounds_paired = sum(partner[rank] >= 0 for partner in plan["schedule"])
        assert all(p[p[rank]] == rank for p in plan["schedule"] if p[rank] >= 0)
        sent = comm[(comm["rank"] == rank) & (comm["tag"] == "train") & (comm["op"] == "send")]
        assert sent["bytes"].sum() == rounds_paired * PAYLOAD and rounds_paired > 0
    assert all(w["accuracy"] > 0.6 for w in workers)
