"""Parameter server: sharding, sync mode = data-parallel SGD (DDP), async staleness, a dying and a slow worker."""

from types import SimpleNamespace

import pytest
import torch

import distlab as dl
from distlab.architectures import parameter_server as ps

MLP_SIZES = [64 * 32, 32, 32 * 10, 10]  # dl.models.mlp(64, 32, 10), in parameter order


def servers_of(run):
    return [r for r in run.results if r["role"] == "server"]


def workers_of(run):
    return {r["rank"]: r for r in run.results if r["role"] == "worker"}


def test_shards_split_the_key_range_evenly_or_at_tensor_boundaries():
    assert ps.shard_bounds(MLP_SIZES, 1) == [(0, 2410)]
    assert ps.shard_bounds(MLP_SIZES, 2, "range") == [(0, 1205), (1205, 2410)]
    assert ps.shard_bounds(MLP_SIZES, 2, "tensor") == [(0, 2048), (2048, 2410)]  # the first weight alone
    assert ps.shard_bounds(MLP_SIZES, 3, "tensor") == [(0, 2048), (2048, 2080), (2080, 2410)]
    with pytest.raises(ValueError, match="shard must be one of"):
        ps.shard_bounds(MLP_SIZES, 2, "rows")
    with pytest.raises(ValueError, match="servers must be between 1 and 4"):
        ps.shard_bounds(MLP_SIZES, 5, "tensor")


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """Final parameters of 25 DDP steps on 3 and on 2 ranks (launched first: one rank pool per size)."""
    runs = str(tmp_path_factory.mktemp("runs"))
    reference = {}
    for world in (3, 2):
        params = dl.launch(ps.ddp_train, world_size=world, timeout=60, steps=25, runs_root=runs).results
        assert all(p == params[0] for p in params)  # DDP's replicas agree with each other
        reference[world] = torch.tensor(params[0])
    return reference


@pytest.mark.timeout(120)
@pytest.mark.parametrize("servers, shard", [(1, "range"), (2, "tensor")])
def test_sync_parameter_server_computes_what_ddp_computes(servers, shard, ddp_reference):
    """Same shards, same minibatches: BSP on the servers = DistributedDataParallel + torch.optim.SGD."""
    run = dl.launch(ps.train, world_size=4, timeout=60, mode="sync", servers=servers, shard=shard, steps=25)
    assert torch.allclose(ps.final_parameters(run.results), ddp_reference[4 - servers], atol=1e-5)
    for server in servers_of(run):
        assert server["version"] == 25 and server["pushes"] == 25 * (4 - servers)  # one update per step
        assert set(server["updates"]["version_staleness"]) == {0} and set(server["updates"]["clock_staleness"]) == {0}
    assert all(len(w["steps"]["step"]) == 25 for w in workers_of(run).values())


@pytest.mark.timeout(60)
def test_async_applies_every_push_and_records_how_stale_it_was():
    run = dl.launch(ps.train, world_size=4, timeout=60, mode="async", steps=30, slow_rank=3, delay=0.04)
    (server,) = servers_of(run)
    updates = server["updates"]
    assert server["pushes"] == len(updates["t"]) == server["version"] >= 90  # each push is one new version
    assert updates["version"] == list(range(server["version"]))
    pulled = [v - s for v, s in zip(updates["version"], updates["version_staleness"])]
    assert min(pulled) >= 0 and max(updates["version_staleness"]) > 0
    for w in (1, 2, 3):  # a worker's successive reads never go back in time
        mine = [p for p, who in zip(pulled, updates["worker"]) if who == w]
        assert mine == sorted(mine)
    steps = {rank: len(w["steps"]["step"]) for rank, w in workers_of(run).items()}
    assert sum(steps.values()) == server["pushes"]
    assert steps[3] < (steps[1] + steps[2]) / 2  # nobody waits for the straggler: the others do more of the work
    bytes_in = server["bytes_in"]  # 32-byte headers (pull, push, goodbye) and 2410 float32 per push
    assert bytes_in == {w: 32 * (2 * steps[w] + 2) + 4 * 2410 * steps[w] for w in steps}


@pytest.mark.timeout(90)
def test_a_slow_worker_holds_sync_back_but_not_async():
    delay, steps = 0.05, 20
    runs = {mode: dl.launch(ps.train, world_size=4, timeout=60, mode=mode, steps=steps, slow_rank=3, delay=delay)
            for mode in ("sync", "async")}
    wall = {mode: max(w["wall_s"] for w in workers_of(run).values()) for mode, run in runs.items()}
    assert wall["sync"] >= steps * delay  # every step waits for the straggler's sleep
    assert wall["async"] < wall["sync"]
    sync_waits = workers_of(runs["sync"])[1]["steps"]["wait"]
    assert sum(sync_waits) > 0.5 * steps * delay  # a fast worker spends the straggler's delay waiting


@pytest.mark.timeout(90)
def test_a_worker_that_dies_is_declared_dead_and_the_rest_finish_the_job():
    run = dl.launch(ps.train, world_size=4, timeout=60, mode="sync", steps=20, crash_rank=2, crash_at=5,
                    failure_timeout=1.0)
    (server,) = servers_of(run)
    workers = workers_of(run)
    assert [(e["worker"], e["event"]) for e in server["events"]] == [(2, "dead")]
    assert workers[2]["crashed_at"] == 5 and len(workers[2]["steps"]["step"]) == 5
    last_push_of_2 = max(t for t, w in zip(server["updates"]["t"], server["updates"]["worker"]) if w == 2)
    assert server["events"][0]["t"] - last_push_of_2 > 0.9  # noticed by 1 s of silence, not by a message
    budget = 20 * 3  # the job is 60 minibatch gradients; the survivors make up for the dead one
    assert budget <= server["pushes"] < budget + 2
    assert len(workers[1]["steps"]["step"]) == len(workers[3]["steps"]["step"]) > 20
    assert set(server["updates"]["version_staleness"]) == {0}  # still BSP with two workers
    assert dl.launch(ps.train, world_size=4, timeout=60, steps=3).results[0]["pushes"] == 9  # ranks reusable


@pytest.mark.parametrize("options, words", [
    ({"mode": "eventually"}, "mode must be one of"),
    ({"servers": 4}, "servers must be between 1 and world_size - 1 = 3"),
    ({"servers": 2, "slow_rank": 1, "delay": 0.01}, r"slow_rank must be a worker rank \(2..3\)"),
    ({"slow_rank": 1, "delay": 3.0}, "delay must be >= 0 and below failure_timeout"),
    ({"crash_rank": 2}, "crash_at must be a step"),
    ({"shard": "rows"}, "shard must be one of"),
    ({"backend": "nccl"}, "needs backend='gloo'"),
])
def test_bad_options_are_refused_with_what_is_allowed(options, words):
    """Checked before any communication, so a stand-in ctx is enough."""
    ctx = SimpleNamespace(rank=0, world_size=4, backend=options.get("backend", "gloo"))
    with pytest.raises(ValueError, match=words):
        ps.train(ctx, **{k: v for k, v in options.items() if k != "backend"})


def test_figures_read_the_records_in_time_order():
    """Two workers, synthetic records: iteration = minibatches so far / workers; counts add up."""
    from distlab.viz import architectures as psviz

    def worker(rank, times):
        steps = {"step": list(range(len(times))), "t": times, "loss": [1.0] * len(times),
                 "clock_staleness": [0] * len(times), "wait": [0.0] * len(times)}
        return {"role": "worker", "rank": rank, "wall_s": max(times), "steps": steps}

    updates = {"t": [0.1, 0.2, 0.3, 0.4], "worker": [1, 2, 1, 1], "clock": [0, 0, 1, 2], "version": [0, 1, 2, 3],
               "version_staleness": [0, 1, 1, 0], "clock_staleness": [0, 0, 1, 2]}
    server = {"role": "server", "rank": 0, "updates": updates, "events": [{"t": 0.35, "worker": 2, "event": "dead"}],
              "bytes_in": {1: 300, 2: 100}, "bytes_out": {1: 200, 2: 100}, "messages": 9, "busy_s": 0.1, "wall_s": 0.5}
    results = [server, worker(1, [0.1, 0.3, 0.4]), worker(2, [0.2])]
    steps = psviz.in_time_order(results)
    assert steps["rank"].tolist() == [1, 2, 1, 1] and steps["iteration"].tolist() == [0.5, 1.0, 1.5, 2.0]
    table = psviz.summary({"run": results})
    assert table.loc["run", "updates"] == 4 and table.loc["run", "max_clock_staleness"] == 2
    histogram = psviz.staleness_histogram({"run": results})
    assert list(histogram.data[0].x) == [0, 1] and list(histogram.data[0].y) == [2, 2]
    traffic = psviz.traffic_figure(results)
    assert [list(bar.y) for bar in traffic.data[:2]] == [[0.3, 0.1], [0.2, 0.1]]  # kB per link, both ways
    assert len(psviz.progress_figure(results).layout.shapes) == 1  # the death, marked
    for fig in (psviz.loss_figure({"run": results}), histogram, traffic):
        assert fig.layout.title.text and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
