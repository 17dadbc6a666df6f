"""The replicated store in its three modes, and the history checker, first on hand-made histories."""

import pickle

import pytest

import distlab as dl
from distlab.consistency.checker import (
    convergence_problems,
    convergence_time,
    linearizability_violations,
    stale_read_rate,
    stale_reads,
    summarize,
)
from distlab.consistency.store import (
    INITIAL,
    History,
    Malformed,
    Op,
    Store,
    decode_reply,
    decode_request,
    encode,
    run_workload,
)

WORLD = 4

# -- the checker on hand-made histories ---------------------------------------------------------
W1 = Op("write", 1, "x", "a", (1, 0), invoke=0.0, complete=1.0)
W2 = Op("write", 2, "x", "b", (2, 0), invoke=2.0, complete=3.0)
GOOD = [
    W1, W2,
    Op("read", 3, "x", None, INITIAL, invoke=-1.0, complete=-0.5),  # before any write
    Op("read", 3, "x", "a", (1, 0), invoke=2.1, complete=2.2),  # concurrent with W2: the old value is fine
    Op("read", 1, "x", "b", (2, 0), invoke=2.5, complete=2.6),  # concurrent with W2: so is the new one
    Op("read", 0, "x", "b", (2, 0), invoke=4.0, complete=4.1),
]
BAD = {  # one bad read or write added to GOOD (after the writes it needs, if any)
    "stale read": [Op("read", 3, "x", "a", (1, 0), invoke=4.0, complete=4.1)],  # W2 completed at 3.0
    "future read": [Op("write", 2, "y", "c", (3, 0), invoke=5.0, complete=6.0),
                    Op("read", 3, "y", "c", (3, 0), invoke=4.0, complete=4.5)],  # before its write began
    "unknown value": [Op("read", 3, "x", "zzz", (7, 0), invoke=4.0, complete=4.1)],
    "read inversion": [Op("read", 3, "x", "a", (1, 0), invoke=2.7, complete=2.8)],  # after a read returned b
    "write order": [Op("write", 3, "x", "c", (0, 3), invoke=3.5, complete=3.6)],  # older version than W2's
}


def test_checker_passes_a_linearizable_history():
    assert linearizability_violations(GOOD) == []
    assert stale_reads(GOOD) == [] and stale_read_rate(GOOD) == 0.0


@pytest.mark.parametrize("kind", sorted(BAD))
def test_checker_flags_a_hand_made_bad_history(kind):
    bad_op = BAD[kind][-1]
    found = linearizability_violations(GOOD + BAD[kind])
    assert [(v.kind, v.op) for v in found] == [(kind, bad_op)]


def test_stale_read_rate_counts_reads_older_than_a_completed_write():
    history = GOOD + BAD["stale read"]
    assert stale_reads(history) == BAD["stale read"]
    assert stale_read_rate(history) == pytest.approx(1 / 5)


def test_convergence_is_every_replica_holding_the_winning_write():
    ops = [W1, W2]
    applied = [[(1.0, "x", (1, 0)), (3.5, "x", (2, 0))], [(4.25, "x", (2, 0))]]
    agreed = History("weak", ops, [{"x": ("b", (2, 0))}] * 2, applied, [{}, {}])
    assert convergence_problems(agreed) == []
    assert convergence_time(agreed) == pytest.approx(4.25 - 3.0)  # W2 completed at 3.0, rank 1 got it at 4.25
    diverged = History("weak", ops, [{"x": ("b", (2, 0))}, {"x": ("a", (1, 0))}], applied, [{}, {}])
    assert convergence_problems(diverged) == ["rank 1 holds ('a', (1, 0)) for x, not the winning write ('b', (2, 0))"]
    assert convergence_time(diverged) is None


def test_a_bad_mode_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="mode must be one of"):
        Store(0, 1, "linearizable")


@pytest.mark.parametrize("raw, reason", [
    (pickle.dumps(("read", "x")), "not a JSON"),  # the store never unpickles (tests/test_security.py attacks it)
    (b'["read", 3]', "a key is not a string"),
    (b'["replicate", ["x", "a", [1]]]', "a version is not a list of 2"),
    (b'["gossip", {"x": ["a", [true, 0]]}]', "a version is not two numbers"),
    (b'["shutdown", null]', "an unknown kind of request"),
])
def test_a_malformed_request_is_refused_with_its_reason(raw, reason):
    with pytest.raises(Malformed, match=reason):
        decode_request(raw)


def test_messages_travel_as_json_with_their_versions_restored_as_tuples():
    assert decode_request(encode(["gossip", {"x": ["a", (1.5, 2)]}])) == ("gossip", {"x": ("a", (1.5, 2))})
    assert decode_reply("read", encode(("a", (3, 0)))) == ("a", (3, 0))
    with pytest.raises(TypeError, match="values must be str, numbers"):
        encode(["write", ["x", {1, 2}]])


# -- real ranks ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def histories(tmp_path_factory):
    """One workload per mode on 4 real ranks (100 operations each, 4 keys, 30% writes)."""
    runs = tmp_path_factory.mktemp("runs")
    found = {}
    for mode in ("strong", "weak", "eventual"):
        run = dl.launch(run_workload, world_size=WORLD, timeout=120, runs_root=runs, mode=mode, ops=100,
                        propagation_delay=0.05)
        assert all(r["converged"] for r in run.results)
        found[mode] = History.from_results(mode, run.results)
    return found


def remote(history, kind):
    """Operations of `kind` that a non-primary rank issued."""
    return sum(op.kind == kind and op.rank != 0 for op in history.ops)


@pytest.mark.timeout(180)
def test_strong_mode_is_linearizable_and_costs_the_messages_primary_backup_predicts(histories):
    history = histories["strong"]
    assert len(history.ops) == WORLD * 100
    assert linearizability_violations(history.ops) == []
    assert stale_reads(history.ops) == []
    assert convergence_problems(history) == [] and convergence_time(history) == 0.0  # backups ack before the reply
    s, writes = summarize(history), sum(op.kind == "write" for op in history.ops)
    assert s["msg/read"] == remote(history, "read") and s["msg/write"] == remote(history, "write")
    assert s["msg/replicate"] == (WORLD - 1) * writes
    assert s["msg/reply"] == remote(history, "read") + remote(history, "write") + (WORLD - 1) * writes


@pytest.mark.timeout(180)
def test_weak_mode_serves_stale_reads_but_never_on_the_primary_and_converges(histories):
    history = histories["weak"]
    stale = stale_reads(history.ops)
    assert stale, "with 50 ms propagation delay some reads must be stale"
    assert {op.rank for op in stale} <= {1, 2, 3}  # the primary applies every write before answering it
    assert {v.kind for v in linearizability_violations(history.ops)} >= {"stale read"}
    assert convergence_problems(history) == [] and convergence_time(history) > 0
    s, writes = summarize(history), sum(op.kind == "write" for op in history.ops)
    assert "msg/read" not in s  # reads are local
    assert s["msg/write"] == s["msg/reply"] == remote(history, "write")
    assert s["msg/update"] == (WORLD - 1) * writes  # every write sent once to every backup


@pytest.mark.timeout(180)
def test_eventual_mode_converges_once_writes_stop_by_gossip_alone(histories):
    history = histories["eventual"]
    assert convergence_problems(history) == []
    assert convergence_time(history) is not None
    assert {kind for m in history.messages for kind in m} == {"gossip"}  # reads and writes are local
    ranks_writing = {op.rank for op in history.ops if op.kind == "write"}
    assert ranks_writing == set(range(WORLD))  # every rank wrote locally, and gossip spread it everywhere


def open_handles(ctx):
    import threading

    import psutil

    me = psutil.Process()
    return threading.active_count(), me.num_fds(), len(me.net_connections())


@pytest.mark.timeout(180)
def test_the_store_leaves_no_thread_socket_or_file_open_in_the_warm_ranks():
    before = dl.launch(open_handles, world_size=WORLD).results
    for mode in ("strong", "weak", "eventual"):
        dl.launch(run_workload, world_size=WORLD, timeout=120, mode=mode, ops=20)
    assert dl.launch(open_handles, world_size=WORLD).results == before
