"""Fault tolerance: checkpoints, restarts (dl.launch and torchrun), stragglers, live fault orders,
more than one node, and the fault control's privacy (tests/test_security.py: what listens on the network)."""

import os
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

import distlab as dl
from distlab import multinode
from distlab.models import largest_difference
from distlab.resilience import training as resilience
from distlab.resilience.checkpoint import Checkpointer, checkpoint_path, latest_complete_step
from distlab.resilience.faults import FaultControl, Faults
from distlab.viz.resilience import chaos_panel


def _max_diff(a: dl.Run, b: dl.Run) -> float:
    return largest_difference([r["params"] for r in a.results], [r["params"] for r in b.results])


def test_resume_uses_the_newest_step_every_rank_saved(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for rank in (0, 1):
        Checkpointer(tmp_path, rank, 2, every=5).save(5, model, opt)
    Checkpointer(tmp_path, 0, 2, every=5).save(10, model, opt)  # rank 1 died before saving step 10
    checkpoint_path(tmp_path, 1, 10).with_suffix(".pt.tmp").write_bytes(b"half a file")
    assert latest_complete_step(tmp_path, 2) == 5
    assert Checkpointer(tmp_path, 1, 2, every=5).restore(model, opt) == 5
    assert not Checkpointer(tmp_path, 0, 2, every=5).save(7, model, opt)  # not a multiple of every


def test_a_rank_saves_only_its_newest_checkpoints(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = Checkpointer(tmp_path, 0, 1, every=1, keep=2)
    for step in range(1, 6):
        saver.save(step, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0-step0000004.pt", "rank0-step0000005.pt"]


@pytest.mark.timeout(240)
def test_launch_restarts_a_killed_rank_and_ends_where_an_uninterrupted_run_ends():
    common = {"steps": 30, "checkpoint_every": 5, "timeout": 120}
    clean = dl.launch(resilience.train, 2, **common)
    with pytest.raises(dl.RankFailure) as failed:
        dl.launch(resilience.train, 2, faults=Faults(kill_at={1: 17}), **common)
    assert failed.value.rank == 1 and "SIGKILL" in failed.value.traceback
    restarted = dl.launch(resilience.train, 2, restarts=1, faults=Faults(kill_at={1: 17}), **common)
    assert restarted.status == "ok"
    assert restarted.config["restarts"] == [{"attempt": 0, "failed_rank": 1}]
    assert [r["resumed_from"] for r in restarted.results] == [15, 15]  # last checkpoint before step 17
    assert set(restarted.metrics["attempt"].dropna()) == {0, 1}
    assert _max_diff(clean, restarted) == 0.0


def test_restarts_is_checked():
    with pytest.raises(ValueError, match="restarts"):
        dl.launch(resilience.train, 2, restarts=-1)


@pytest.mark.timeout(240)
def test_a_deadline_drops_the_stragglers_gradient_instead_of_waiting_for_it():
    slow = Faults(slow_ms={1: 600})
    waiting = dl.launch(resilience.train, 2, steps=6, faults=slow, timeout=120)
    dropping = dl.launch(resilience.train, 2, steps=6, faults=slow, deadline_ms=150, timeout=120)
    waited, dropped = (run.metrics.dropna(subset=["step"]) for run in (waiting, dropping))
    assert (waited["contributors"] == 2).all()
    assert (waited[waited["rank"] == 1]["step_seconds"] >= 0.6).all()  # the straggler's own sleep
    assert waited[waited["rank"] == 0]["step_seconds"].median() >= 0.9 * 0.6  # the others wait for it
    assert dropped[dropped["rank"] == 1]["loss"].isna().all()  # the slow rank never makes the deadline
    assert (dropped["contributors"] <= 1).all() and (dropped["contributors"] == 1).mean() > 0.5
    assert dropped["step_seconds"].median() < 0.5 * waited["step_seconds"].median()
    assert torch.equal(*(r["params"] for r in dropping.results))  # the replicas still agree


@pytest.mark.timeout(240)
def test_live_orders_reach_running_ranks_through_the_store():
    control = FaultControl()
    control.slow(0, 120)
    run = dl.launch(resilience.train, 2, steps=40, faults=control.faults(), restarts=1, block=False, timeout=180)
    time.sleep(1.0)
    control.kill(1)
    assert control.wait_until_taken(1, timeout=60)
    run.wait()
    assert run.status == "ok" and run.config["restarts"] == [{"attempt": 0, "failed_rank": 1}]
    rows = run.metrics.dropna(subset=["step"])
    assert (rows[rows["rank"] == 0]["step_seconds"] >= 0.12).all()  # the order reached rank 0, both attempts
    assert rows[rows["rank"] == 1]["step_seconds"].median() >= 0.9 * 0.12  # and rank 1 waited for it
    assert "fault injected: rank 1 killed" in run.logs(1)


def test_every_rank_ms_slows_the_ranks_slow_ms_leaves_out_and_a_live_order_overrides_both():
    control = FaultControl()
    faults = control.faults(slow_ms={1: 50}, every_rank_ms=20)
    delays = {rank: faults.step_delay(SimpleNamespace(rank=rank)) for rank in range(5)}
    assert delays == {0: 0.02, 1: 0.05, 2: 0.02, 3: 0.02, 4: 0.02}
    control.heal(3)
    control.slow(1, 120)
    assert [faults.step_delay(SimpleNamespace(rank=rank)) for rank in (1, 3, 4)] == [0.12, 0.0, 0.02]


def test_the_chaos_panel_sends_orders():
    control = FaultControl()
    panel = chaos_panel(control, world_size=3)
    (rank, delay), buttons = panel.children[0].children, panel.children[1].children
    rank.value, delay.value = 1, 250
    buttons[0].click()
    assert control.store.get("slow/1") == b"250.0"
    buttons[1].click()
    assert control.store.get("slow/1") == b"0"
    buttons[2].click()
    assert control.store.check(["kill/1"]) and "kill rank 1" in panel.children[2].value


@pytest.mark.timeout(300)
def test_two_torchrun_nodes_compute_what_one_launch_computes(tmp_path):
    nodes = multinode.run_local_nodes("distlab.resilience.training:train", nnodes=2, nproc_per_node=2, steps=12,
                                      runs_root=tmp_path / "nodes", timeout=240)
    assert nodes.config["launcher"] == "torchrun" and len(nodes.results) == 4
    one_launch = dl.launch(resilience.train, 4, steps=12, timeout=120)
    assert _max_diff(nodes, one_launch) == 0.0


@pytest.mark.timeout(300)
def test_torchrun_restarts_after_a_kill_and_resumes_from_the_checkpoint(tmp_path):
    resumed = multinode.run_local_nodes(
        "distlab.resilience.training:train", nnodes=1, nproc_per_node=2, max_restarts=1, steps=20, checkpoint_every=5,
        checkpoint_dir=str(tmp_path / "checkpoints"), faults={"kill_at": {1: 12}}, runs_root=tmp_path / "runs",
        timeout=240)
    assert [r["resumed_from"] for r in resumed.results] == [10, 10]
    clean = dl.launch(resilience.train, 2, steps=20, timeout=120)
    assert _max_diff(resumed, clean) == 0.0


def _listening(pids) -> list[str]:
    found = []
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.append(conn.laddr.ip)
    return found


def test_the_fault_control_is_a_private_file_and_listens_on_no_socket():
    """Anyone who can write to the control can kill a student's ranks: only its owner may open it."""
    before = _listening([os.getpid()])
    control = FaultControl()
    orders = Path(control.address)
    control.kill(1)  # written to: the file keeps its mode
    assert stat.S_IMODE(orders.parent.stat().st_mode) == 0o700 and list(orders.parent.iterdir()) == [orders]
    assert stat.S_IMODE(orders.stat().st_mode) == 0o600
    assert _listening([os.getpid()]) == before  # no TCP socket listens for it
    control.close()
    assert not orders.parent.exists()
