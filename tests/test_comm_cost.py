"""Bytes counted by the instrumented layer equal the analytic counts; the alpha-beta fit; the replay record."""

import pytest
import torch

import distlab as dl
from distlab.communication import collectives, cost

NUMELS = (4096, 1001)  # divisible by 2 and 4, and not divisible by 3 or 4


def all_reduce_counted(ctx):
    """Each algorithm on each size, its sends and receives counted in ctx.comm under their own op name."""
    for algorithm in collectives.ALL_REDUCES:
        for numel in NUMELS:
            collectives.all_reduce(torch.ones(numel), algorithm=algorithm,
                                   events=ctx.comm.events(f"{algorithm}/{numel}"))
    events = ctx.comm.events("replay")
    collectives.ring_all_reduce(torch.ones(10), events=events)
    ctx.log(step=0)  # the metrics row sums this rank's training traffic: sends and receives
    return events.rows


@pytest.fixture(scope="module", params=[3, 4])
def counted(request):
    return dl.launch(all_reduce_counted, world_size=request.param, timeout=60)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algorithm", collectives.ALL_REDUCES)
@pytest.mark.parametrize("numel", NUMELS)
def test_measured_bytes_per_rank_equal_the_analytic_count(counted, algorithm, numel):
    n = len(counted.results)
    comm_table, name = counted.comm, f"{algorithm}/{numel}"
    sends, recvs = (comm_table[comm_table["op"] == f"{name} {kind}"] for kind in ("send", "recv"))
    measured = sends.groupby("rank")["bytes"].sum().reindex(range(n), fill_value=0)
    assert measured.tolist() == [cost.sent_bytes(algorithm, numel, 4, n, r) for r in range(n)]
    assert sends["bytes"].sum() == recvs["bytes"].sum()  # every byte sent is received
    assert set(comm_table["tag"]) == {"train"}  # the algorithm's own traffic, not telemetry overhead


def test_analytic_counts_are_the_textbook_formulas_when_n_divides_the_size():
    size = 4 * 4096
    for n in (2, 4, 8):
        assert {cost.sent_bytes("ring", 4096, 4, n, r) for r in range(n)} == {2 * (n - 1) * size // n}
        assert cost.sent_bytes("naive", 4096, 4, n, 0) == (n - 1) * size
        assert cost.sent_bytes("recursive_doubling", 4096, 4, n, 1) == (n.bit_length() - 1) * size
    assert cost.chunk_sizes(1001, 4) == [len(c) for c in torch.arange(1001).tensor_split(4)]


def test_metrics_rows_carry_the_recorded_bytes(counted):
    rows = counted.metrics.set_index("rank")["comm_bytes"]
    assert rows.tolist() == counted.comm.groupby("rank")["bytes"].sum().reindex(rows.index).tolist()


def test_ring_replay_record_follows_the_schedule(counted):
    """Step s (0..2N-3): rank r sends chunk r-s to rank r+1, reduce-scatter first, then all-gather."""
    n = len(counted.results)
    sends = [e for rows in counted.results for e in rows if e["kind"] == "send"]
    recvs = {(e["src"], e["dst"], e["chunk"], e["step"])
             for rows in counted.results for e in rows if e["kind"] == "recv"}
    assert len(sends) == n * 2 * (n - 1) and len(recvs) == len(sends)
    for e in sends:
        assert e["dst"] == (e["src"] + 1) % n and e["chunk"] == (e["src"] - e["step"]) % n
        assert e["phase"] == ("reduce-scatter" if e["step"] < n - 1 else "all-gather")
        assert (e["src"], e["dst"], e["chunk"], e["step"]) in recvs and e["t_end"] >= e["t_start"]
    assert [e["step"] for e in sends if e["src"] == 0] == list(range(2 * (n - 1)))


def test_alpha_beta_fit_recovers_the_parameters_of_its_model():
    alpha, beta = 5e-5, 2e-9
    sizes = [2**k for k in range(10, 27)]
    rounds = [6] * len(sizes)
    noise = torch.Generator().manual_seed(0)
    seconds = [(alpha * 6 + beta * s) * (1 + 0.02 * torch.randn(1, generator=noise).item()) for s in sizes]
    fit_alpha, fit_beta = cost.fit_alpha_beta(rounds, sizes, seconds)
    assert fit_alpha == pytest.approx(alpha, rel=0.05) and fit_beta == pytest.approx(beta, rel=0.05)
    assert cost.predict_seconds(fit_alpha, fit_beta, 6, 2**20) == pytest.approx(alpha * 6 + beta * 2**20, rel=0.05)


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="algorithm must be one of"):
        cost.sent_bytes("tree", 10, 4, 4, 0)


def test_bandwidth_coefficients_and_the_ring_tree_crossover():
    for n in (2, 4, 8, 64):
        assert cost.bytes_per_payload_byte("ring", n) == pytest.approx(2 * (n - 1) / n)
        assert cost.bytes_per_payload_byte("naive", n) == n - 1
        assert cost.bytes_per_payload_byte("recursive_doubling", n) == n.bit_length() - 1
    alpha, beta = 1e-5, 1e-9
    s = cost.crossover_bytes(alpha, beta, 8)  # the sizes where the two model times are equal
    ring, tree = (cost.predict_seconds(alpha, beta, cost.message_rounds(a, 8), cost.bytes_per_payload_byte(a, 8) * s)
                  for a in ("ring", "recursive_doubling"))
    assert ring == pytest.approx(tree)
    assert cost.crossover_bytes(alpha, beta, 8, slow="naive") == 0.0  # same rounds, fewer bytes: the ring always wins
    assert cost.crossover_bytes(alpha, beta, 2) is None
