"""The store under faults, on real ranks: who stays available, who stays linearizable, who converges."""

import functools
import math
import os
import stat
import threading
import time

import pytest
import torch.distributed as dist

import distlab as dl
from distlab.consistency import checker, experiments, faults, linearizability
from distlab.consistency.faults import Event, Faults, Schedule
from distlab.consistency.store import Store, Unavailable

START, END = 0.25, 0.85  # the partition of experiments.SCHEDULES, seconds after the start
MAJORITY, MINORITY = (0, 1), (2,)


def test_the_fault_experiments_run_on_three_ranks_and_a_perfect_network_on_any_that_holds_a_quorum(tmp_path):
    """Refused before any process starts, with the sizes that work: the schedules name ranks 0, 1 | 2."""
    work = functools.partial(experiments.faulted_workload, timeout=0.1)
    with pytest.raises(dl.WorldSizeError, match=r"cannot run on 2 rank\(s\): the fault schedules .* runs on: 3\.$"):
        dl.launch(work, world_size=2, runs_root=str(tmp_path), schedule=experiments.SCHEDULES["partition"],
                  mode="quorum", quorum=(2, 2))
    with pytest.raises(dl.WorldSizeError, match=r"runs on: 3, 4, 5, .*, 16\.$"):
        dl.launch(work, world_size=2, runs_root=str(tmp_path), schedule=faults.NONE, mode="quorum", quorum=(3, 3))
    assert not any(tmp_path.iterdir()), "a refused launch must not create a run folder"


# -- the fault layer alone --------------------------------------------------------------------------
def test_a_schedule_says_what_holds_at_each_moment():
    schedule = Schedule("mixed", (Event(0.1, "drop", fraction=0.5), Event(0.2, "partition", groups=((0, 1), (2,))),
                                  Event(0.3, "pause", rank=1, seconds=0.2), Event(0.4, "heal")))
    view = Faults(schedule, rank=0, t0=100.0)
    assert view.state(100.05) == {"groups": (), "fraction": 0.0, "ms": 0.0, "paused": {}}
    assert view.state(100.25)["groups"] == ((0, 1), (2,)) and view.state(100.25)["fraction"] == 0.5
    assert view.state(100.45) == {"groups": (), "fraction": 0.0, "ms": 0.0, "paused": {1: pytest.approx(100.5)}}
    assert view.apart(0, 2, ((0, 1), (2,))) and not view.apart(0, 1, ((0, 1), (2,)))
    assert view.apart(3, 0, ((0, 1), (2,)))  # a rank in no group is alone
    assert "200 ms: partition 0,1 | 2" in schedule.describe() and schedule.describe().endswith("400 ms: heal")


def test_a_seeded_drop_loses_its_fraction_and_a_delay_stays_in_its_bound():
    view = Faults(faults.lossy(0.3, start=-1.0, end=1e12, seed=4), rank=1, t0=0.0)
    fates = [view.fate(1, 0) for _ in range(20_000)]
    assert sum(f is None for f in fates) / len(fates) == pytest.approx(0.3, abs=0.015)
    again = Faults(faults.lossy(0.3, start=-1.0, end=1e12, seed=4), rank=1, t0=0.0)
    assert [again.fate(1, 0) for _ in range(20_000)] == fates  # the same seed, the same losses
    slow = Faults(faults.delayed(40, start=-1.0, end=1e12), rank=0, t0=0.0)
    waits = [slow.fate(0, 1) for _ in range(2000)]
    assert 0 <= min(waits) and max(waits) <= 0.040 and sum(waits) / len(waits) == pytest.approx(0.020, abs=0.002)


def test_a_bad_event_is_refused_with_the_allowed_kinds():
    with pytest.raises(ValueError, match="kind must be one of"):
        Event(0.1, "flood")
    with pytest.raises(ValueError, match="label must be one of"):
        experiments.run_under_faults("paxos")


# -- real ranks: one workload per (mode, schedule), shared by the tests -----------------------------
RUNS = [("strong", "partition"), ("quorum R=2 W=2", "partition"), ("eventual", "partition"),
        ("quorum R=1 W=1", "partition"), ("quorum R=2 W=2", "drop 30%"), ("strong", "pause rank 0"),
        ("quorum R=2 W=2", "pause rank 0")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    found = {(label, name): experiments.run_under_faults(label, experiments.SCHEDULES[name], runs_root=root)
             for label, name in RUNS if label != "eventual"}
    # eventual: the operations stop at the heal, so that what survives is what the two sides wrote apart
    found["eventual", "partition"] = experiments.run_under_faults(
        "eventual", experiments.SCHEDULES["partition"], duration=END, runs_root=root)
    return found


def side(run, ranks, kind=None, tail=0.3):
    """Operations invoked during the faults by `ranks` (of `kind`, if given), not in their last `tail` s: an
    operation that waits that long (a reply timeout, a lock held by a write timing out) may end after the heal."""
    return [op for op in run.during() if op.rank in ranks and (kind is None or op.kind == kind)
            and op.invoke - run.t0 < run.window()[1] - tail]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("label", ["strong", "quorum R=2 W=2"])
def test_under_a_partition_strong_modes_refuse_the_minority_and_stay_linearizable(runs, label):
    run = runs[label, "partition"]
    minority = side(run, MINORITY)
    assert minority and all(op.outcome != "ok" for op in minority)  # unavailable: refused or timed out
    majority = side(run, MAJORITY, "read")
    assert majority and all(op.outcome == "ok" for op in majority)  # the primary / a quorum is on this side
    verdict = linearizability.check(run.history.ops)
    assert verdict.ok, str(verdict)
    assert checker.stale_reads(run.history.ops) == []


@pytest.mark.timeout(120)
def test_primary_backup_blocks_even_the_majoritys_writes_but_a_write_quorum_does_not(runs):
    """Primary-backup waits for every backup; a quorum for W of N: the majority side keeps writing."""
    strong_writes = side(runs["strong", "partition"], MAJORITY, "write")
    quorum_writes = side(runs["quorum R=2 W=2", "partition"], MAJORITY, "write")
    assert strong_writes and all(op.outcome == "unknown" for op in strong_writes)
    assert quorum_writes and all(op.outcome == "ok" for op in quorum_writes)


@pytest.mark.timeout(120)
def test_eventual_stays_available_on_both_sides_diverges_and_converges_after_the_heal(runs):
    run = runs["eventual", "partition"]
    assert all(op.outcome == "ok" for op in run.history.ops)  # available everywhere, all along
    for here, there in ((MAJORITY, MINORITY), (MINORITY, MAJORITY)):
        written_there = {op.value for op in side(run, there, "write") if op.invoke - run.t0 > START + 0.05}
        seen_here = {op.value for op in side(run, here, "read")}
        assert written_there and not seen_here & written_there  # no write crossed the partition: they diverged
    assert run.converged and checker.convergence_problems(run.history) == []
    for row in experiments.survivors(run):  # last writer wins: the later of the two sides' last writes
        last = {op.value: op for op in run.history.ops if op.kind == "write"}
        candidates = [last[v] for k, v in row.items() if k.startswith("last write") and v is not None]
        assert row["survivor"] == max(candidates, key=lambda op: op.version).value
    assert linearizability.check(run.history.ops).result == linearizability.NOT_LINEARIZABLE


@pytest.mark.timeout(120)
def test_r_plus_w_at_most_n_reads_stale_and_the_search_rejects_it(runs):
    run = runs["quorum R=1 W=1", "partition"]
    assert all(op.outcome == "ok" for op in run.history.ops)  # R = W = 1: always available
    stale = checker.stale_reads(run.history.ops)
    assert stale and {op.rank for op in stale} & set(MINORITY)
    verdict = linearizability.check(run.history.ops)
    assert verdict.result == linearizability.NOT_LINEARIZABLE
    culprit = verdict.failures()[0].culprit
    assert culprit.kind == "read" and "no order of the first" in verdict.failures()[0].explanation


@pytest.mark.timeout(120)
def test_lost_messages_and_a_paused_replica_do_not_break_a_majority_quorum(runs):
    lossy = runs["quorum R=2 W=2", "drop 30%"]
    assert lossy.lost > 20 and linearizability.check(lossy.history.ops).ok
    assert 0 < experiments.measure(lossy)["availability_during_fault"] < 1  # some quorums lost, some met
    quorum, strong = runs["quorum R=2 W=2", "pause rank 0"], runs["strong", "pause rank 0"]
    assert all(op.outcome == "ok" for op in quorum.during() if op.rank != 0)  # ranks 1, 2 are a quorum
    waiting = side(strong, (1, 2), tail=0.16)  # the reply timeout is 0.15 s
    assert waiting and all(op.outcome != "ok" for op in waiting)  # every op waits for the paused primary
    assert linearizability.check(strong.history.ops).ok


@pytest.mark.timeout(120)
def test_the_table_has_one_row_per_run_with_what_the_histories_say(runs):
    table = experiments.fault_table(list(runs.values()))
    assert len(table) == len(RUNS) and table.index.names == ["schedule", "mode"]
    partition = table.loc["partition 0,1 | 2"]
    assert partition.loc["eventual", "availability"] == 1.0
    assert partition.loc["eventual", "minority_availability"] == 1.0
    assert partition.loc["strong", "minority_availability"] == 0.0
    assert partition.loc["quorum R=2 W=2", "minority_availability"] == 0.0
    assert partition.loc["quorum R=2 W=2", "stale_read_rate"] == 0.0
    assert partition.loc["quorum R=1 W=1", "stale_read_rate"] > 0
    assert list(partition["linearizable"]) == ["linearizable", "linearizable", "not linearizable", "not linearizable"]
    for run in runs.values():
        row = table.loc[(run.schedule.name, run.label)]
        ok = sum(op.outcome == "ok" for op in run.history.ops)
        assert math.isclose(row["availability"], ok / len(run.history.ops))
        sent = sum(sum(m.values()) for m in run.history.messages)
        assert math.isclose(row["messages_per_op"], sent / len(run.history.ops))
    eventual = table.loc[("partition 0,1 | 2", "eventual")]
    assert eventual["lost_messages"] > 0  # gossip across the partition was cut


STUCK = 0.6  # seconds the primary waits for the cut-off backup's acknowledgement


def read_beside_a_write_the_primary_cannot_replicate(ctx, timeout=STUCK):
    """Strong mode, rank 2 cut off: rank 1 forwards a write, which the primary holds for `timeout` waiting for
    rank 2's acknowledgement, and reads meanwhile. Returns rank 1's (read seconds, write outcome)."""
    cut = Schedule("cut", (Event(0.0, "partition", groups=(MAJORITY, MINORITY)),))
    store = Store(ctx.rank, ctx.world_size, "strong", timeout=timeout, faults=Faults(cut, ctx.rank, time.time() - 1))
    outcome, seconds = [], None
    try:
        dist.barrier()
        if ctx.rank == 1:
            def write():
                try:
                    outcome.append(store.write("k", 1))
                except (Unavailable, TimeoutError) as error:
                    outcome.append(type(error).__name__)
            writer = threading.Thread(target=write)
            writer.start()
            time.sleep(timeout / 6)  # the write is now waiting on the primary
            start = time.monotonic()
            store.read("k")
            seconds = time.monotonic() - start
            writer.join()
        dist.barrier()
        store.stop()
        dist.barrier()
    finally:
        store.close()
    return seconds, outcome


@pytest.mark.timeout(120)
def test_the_primary_answers_reads_while_a_forwarded_write_waits_for_a_cut_off_backup(tmp_path):
    seconds, outcome = dl.launch(read_beside_a_write_the_primary_cannot_replicate, world_size=3,
                                 runs_root=str(tmp_path), quiet=True).results[1]
    assert outcome in (["Unavailable"], ["TimeoutError"]), outcome  # the write could not reach rank 2
    assert seconds < STUCK / 4, f"the read waited {seconds:.3f} s behind the write"


# -- faults ordered by hand (the notebook's panel) --------------------------------------------------
def test_a_network_control_is_private_and_read_live_message_by_message():
    control = faults.NetworkControl()
    assert stat.S_IMODE(os.stat(control.folder).st_mode) == 0o700  # no other local user reads or rewrites it
    view = control.faults(rank=2, t0=0.0)
    assert view.fate(2, 0) == 0.0
    control.order("partition", groups=(MAJORITY, MINORITY))
    assert view.fate(2, 0) is None and view.fate(0, 1) == 0.0  # the next message already sees the order
    control.order("heal")
    assert view.fate(0, 2) == 0.0


@pytest.mark.timeout(120)
def test_a_partition_ordered_by_hand_reaches_every_rank_and_becomes_the_runs_schedule():
    control = faults.NetworkControl()
    control.order("partition", groups=(MAJORITY, MINORITY))
    run = experiments.start_under_control("quorum R=2 W=2", control, duration=0.6)
    run.wait()
    control.order("heal")
    result = experiments.fault_run("quorum R=2 W=2", run, control)
    minority, majority = side(result, MINORITY), side(result, MAJORITY)
    assert minority and all(op.outcome != "ok" for op in minority)
    assert majority and all(op.outcome == "ok" for op in majority)
    assert linearizability.check(result.history.ops).ok
    partitioned, healed = result.schedule.events
    assert (partitioned.kind, healed.kind) == ("partition", "heal")
    assert partitioned.at < 0 < 0.6 < healed.at  # ordered before the operations began, healed after they ended
