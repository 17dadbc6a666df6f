"""Choosing an architecture: the comparison's rows agree with each module's own accounting and with the
analytic byte counts; every architecture processes the same examples and learns the task."""

import math

import pytest

import distlab as dl
from distlab.architectures import compare
from distlab.communication.cost import ring_allreduce_bytes
from distlab.viz import architectures as cviz

PAYLOAD = compare.PAYLOAD  # 2,410 float32 parameters
EXAMPLES = 1438  # digits training examples (1,797 minus 359 held out)
TASK = compare.Task()  # 5 epochs, batch 32, lr 0.5, 4 ranks
PLAN = compare.plan(TASK, EXAMPLES)


# -- in-process: the plan and the cost model ------------------------------------------------------------

def test_the_plan_gives_every_architecture_the_same_examples_to_the_nearest_step():
    assert PLAN == {"samples": 5 * EXAMPLES, "steps": 56, "worker_steps": 75, "rounds": 5}
    assert compare.train_examples() == EXAMPLES
    for processed, per_step in ((PLAN["steps"] * 4 * 32, 4 * 32), (PLAN["worker_steps"] * 3 * 32, 3 * 32)):
        assert abs(processed - PLAN["samples"]) <= per_step / 2


def test_bad_input_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="epochs, batch and lr must be positive"):
        compare.Task(epochs=0)
    with pytest.raises(ValueError, match="world_size must be >= 3"):
        compare.Task(world_size=2)
    with pytest.raises(ValueError, match="architectures must be among"):
        compare.compare(architectures=("all-reduce", "star"))
    with pytest.raises(ValueError, match="architecture must be one of"):
        compare.busiest_bytes_per_sync("star", 4)


def test_cost_model_per_round():
    assert compare.busiest_bytes_per_sync("all-reduce", 4) == ring_allreduce_bytes(PAYLOAD, 4) == 1.5 * PAYLOAD
    assert compare.busiest_bytes_per_sync("gossip ring", 64) == 2 * PAYLOAD  # degree-bounded: flat in N
    assert compare.busiest_bytes_per_sync("gossip full", 64) == 63 * PAYLOAD
    assert compare.busiest_bytes_per_sync("PS sync", 64) == compare.busiest_bytes_per_sync("FedAvg", 64) == 63 * PAYLOAD


# -- one comparison on real ranks, read by the tests below -----------------------------------------------

@pytest.fixture(scope="module")
def table(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DISTLAB_RUNS", str(tmp_path_factory.mktemp("runs")))
        return compare.compare(TASK, timeout=120)


def results(table, name):
    return dl.load_run(table.loc[name, "run_dir"]).results


@pytest.mark.timeout(400)
def test_every_architecture_processes_the_same_number_of_examples(table):
    assert list(table.index) == list(compare.ARCHITECTURES)
    for name in ("all-reduce", "gossip ring", "gossip full"):
        assert table.loc[name, "samples"] == PLAN["steps"] * 4 * 32
    assert table.loc["PS sync", "samples"] == PLAN["worker_steps"] * 3 * 32
    assert table.loc["FedAvg", "samples"] == PLAN["samples"]  # every client's examples once per round
    # async: the servers stop at the budget of pushes; pushes already in flight may add one per other worker
    assert 0 <= table.loc["PS async", "samples"] - PLAN["worker_steps"] * 3 * 32 <= 2 * 32
    # so every row is within rounding to whole steps plus those two in-flight pushes of the same total
    assert (abs(table["samples"] - PLAN["samples"]) <= 32 + 2 * 32).all()


@pytest.mark.timeout(400)
def test_all_reduce_bytes_are_the_analytic_ring_count_for_the_steps_run(table):
    steps = PLAN["steps"]
    assert table.loc["all-reduce", "updates"] == steps
    assert table.loc["all-reduce", "bytes_by_rank"] == [steps * round(2 * 3 / 4 * PAYLOAD)] * 4
    comm = dl.load_run(table.loc["all-reduce", "run_dir"]).comm.query("tag == 'train'")
    assert (comm.op == "all_reduce").all() and comm.groupby("rank")["bytes"].sum().tolist() == [steps * PAYLOAD] * 4


@pytest.mark.timeout(400)
def test_gossip_sends_one_copy_per_neighbour_per_step(table):
    assert table.loc["gossip ring", "bytes_by_rank"] == [PLAN["steps"] * 2 * PAYLOAD] * 4
    assert table.loc["gossip full", "bytes_by_rank"] == [PLAN["steps"] * 3 * PAYLOAD] * 4


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["PS sync", "PS async"])
def test_parameter_server_bytes_count_every_message(table, name):
    """Per worker: a 32-byte header per pull (one more than its pushes: the last is told to stop), a
    header plus the gradient per push, a goodbye; the server answers each pull with 24 bytes + the model."""
    pushes = {r["rank"]: len(r["steps"]["step"]) for r in results(table, name) if r["role"] == "worker"}
    sent = table.loc[name, "bytes_by_rank"]
    assert sent[0] == sum((p + 1) * (24 + PAYLOAD) for p in pushes.values())
    assert sent[1:] == [p * (32 + PAYLOAD) + (p + 1) * 32 + 32 for _, p in sorted(pushes.items())]
    if name == "PS sync":
        assert set(pushes.values()) == {PLAN["worker_steps"]} and table.loc[name, "updates"] == PLAN["worker_steps"]
        assert table.loc[name, "staleness"] == 0
    else:
        assert table.loc[name, "updates"] == sum(pushes.values())  # every push applied on arrival
        assert table.loc[name, "staleness"] > 0  # other workers' pushes landed between pull and push


@pytest.mark.timeout(400)
def test_fedavg_sends_the_model_once_per_client_per_round(table):
    rounds = PLAN["rounds"]
    assert table.loc["FedAvg", "updates"] == table.loc["FedAvg", "syncs"] == rounds
    assert table.loc["FedAvg", "bytes_by_rank"] == [rounds * 3 * PAYLOAD] + [rounds * (PAYLOAD + 4)] * 3


@pytest.mark.timeout(400)
def test_busiest_rank_per_round_is_what_the_cost_model_says(table):
    for name, row in table.iterrows():
        per_round = row["bytes_busiest"] / row["syncs"]  # message headers and the stop reply included
        assert per_round == pytest.approx(compare.busiest_bytes_per_sync(name, 4), rel=0.03), name
    assert table["bytes_total"].idxmin() == "FedAvg"  # 5 rounds instead of 56 or 75


@pytest.mark.timeout(400)
def test_every_architecture_learns_and_drift_is_where_the_notebook_says(table):
    assert (table["accuracy"] > 0.6).all(), table["accuracy"]
    # full-graph gossip mixes with W = 1/N after the local step: data-parallel SGD again
    assert table.loc["gossip full", "accuracy"] == pytest.approx(table.loc["all-reduce", "accuracy"], abs=1e-6)
    assert table.loc["all-reduce", "drift"] < 1e-5 and table.loc["gossip full", "drift"] < 1e-5
    assert table.loc["gossip ring", "drift"] > 1e-2
    assert all(math.isnan(table.loc[name, "drift"]) for name in ("PS sync", "PS async", "FedAvg"))


@pytest.mark.timeout(400)
def test_figures_plot_the_table(table):
    fig = cviz.accuracy_vs_bytes(table)
    assert fig.layout.title.text and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    assert {t.name: (t.x[0], t.y[0]) for t in fig.data} == {
        name: (row["bytes_total"] / 1e6, row["accuracy"]) for name, row in table.iterrows()}
    wall = cviz.accuracy_vs_wall_time(table)
    assert [t.x[0] for t in wall.data] == table["wall_s"].tolist()
    bars = cviz.metric_bars(table)
    drift = next(t for t in bars.data if t.name.startswith("drift"))
    assert [v is None for v in drift.y] == [math.isnan(d) for d in table["drift"]]
    per_rank = cviz.bytes_by_rank(table)
    assert [t.name for t in per_rank.data] == [f"rank {r}" for r in range(4)]
    measured = [t for t in cviz.scaling(table).data if t.mode == "markers"]
    assert [t.y[0] for t in measured] == pytest.approx((table["bytes_busiest"] / table["syncs"] / PAYLOAD).tolist())


@pytest.mark.timeout(200)
def test_a_straggler_holds_back_sync_but_not_async(tmp_path):
    delay = 0.02
    rows = compare.stragglers(TASK, delay=delay, timeout=120)
    sync, asynchronous = rows.loc["PS sync + straggler"], rows.loc["PS async + straggler"]
    assert sync["wall_s"] >= PLAN["worker_steps"] * delay  # every sync step waits for the sleeper
    pushes = {r["rank"]: len(r["steps"]["step"])
              for r in results(rows, "PS async + straggler") if r["role"] == "worker"}
    assert pushes[3] < max(pushes[1], pushes[2])  # async: the others do the straggler's share
    assert (sync["samples"] == PLAN["worker_steps"] * 3 * 32 and sync["accuracy"] > 0.6
            and asynchronous["accuracy"] > 0.6)


@pytest.mark.timeout(200)
def test_a_launch_on_another_world_size_takes_its_plan_from_the_size_it_got(monkeypatch, tmp_path):
    """A student's first experiment changes the number of ranks: asked for 4, given 3 (as tests/test_world_sizes.py
    does), FedAvg trains 2 clients and the row counts 3 ranks' bytes."""
    asked = []

    def given_three(fn, world_size, *args, **kwargs):
        asked.append(world_size)
        return dl.launch(fn, 3, *args, **kwargs)

    monkeypatch.setattr(compare, "launch", given_three)
    monkeypatch.setenv("DISTLAB_RUNS", str(tmp_path))
    table = compare.compare(TASK, architectures=("FedAvg", "gossip full"), timeout=120)
    assert set(asked) == {4} and table["world_size"].tolist() == [3, 3]
    rounds, steps = PLAN["rounds"], compare.plan(compare.sized(TASK, 3))["steps"]
    assert table.loc["FedAvg", "bytes_by_rank"] == [rounds * 2 * PAYLOAD] + [rounds * (PAYLOAD + 4)] * 2
    assert table.loc["FedAvg", "samples"] == PLAN["samples"]  # the same work, on two clients
    assert table.loc["gossip full", "bytes_by_rank"] == [steps * 2 * PAYLOAD] * 3  # 2 neighbours each
