"""The parameter server as a single point of failure: its crash is reported naming it, and a restart resumes
from its checkpoint (the step count goes on from there) and ends where an uninterrupted run ends."""

import time

import pytest

import distlab as dl
from distlab.architectures import parameter_server as ps
from distlab.models import largest_difference

JOB = {"mode": "sync", "steps": 30, "checkpoint_every": 5}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return dl.launch(ps.train, world_size=3, timeout=60, runs_root=str(tmp_path_factory.mktemp("runs")), **JOB)


def test_a_crashed_server_fails_the_launch_naming_it_and_nothing_hangs(tmp_path):
    began = time.monotonic()
    with pytest.raises(dl.RankFailure) as failure:
        dl.launch(ps.train, world_size=3, timeout=60, runs_root=str(tmp_path), crash_rank=0, crash_at=12, **JOB)
    assert failure.value.rank == 0
    assert "parameter server rank 0 crashed at update 12" in str(failure.value)
    assert "SIGKILL" in str(failure.value)
    assert time.monotonic() - began < 50  # well before the 60 s timeout: broken connections end the workers


def test_a_restart_resumes_from_the_servers_last_checkpoint_and_ends_where_a_clean_run_ends(clean, tmp_path):
    run = dl.launch(ps.train, world_size=3, timeout=90, runs_root=str(tmp_path), restarts=1, crash_rank=0,
                    crash_at=12, **JOB)
    assert [r["failed_rank"] for r in run.config["restarts"]] == [0]
    server, workers = run.results[0], run.results[1:]
    assert server["resumed_from"] == 10  # the last multiple of checkpoint_every before the crash at 12
    for worker in workers:
        assert worker["resumed_from"] == 10 and worker["steps"]["step"] == list(range(10, 30))
    assert server["version"] == 30 and server["pushes"] == 30 * 2  # the job's work, counted across the restart
    resumed = run.metrics[run.metrics["attempt"] == 1]
    assert resumed.groupby("rank")["step"].min().tolist() == [10, 10]
    first = run.metrics[run.metrics["attempt"] == 0]
    assert first["step"].max() >= 10  # the first attempt got past the checkpoint before the crash
    gap = largest_difference(ps.final_parameters(run.results), ps.final_parameters(clean.results))
    assert gap <= 1e-5  # the same minibatches from the same state: the clean run's parameters, to rounding
    assert ps.accuracy(run.results) == pytest.approx(ps.accuracy(clean.results), abs=0.01)


def test_checkpoints_of_several_async_servers_are_refused_and_the_world_size_rule_names_the_ranks():
    with pytest.raises(ValueError, match="checkpoint_every with several servers needs staleness=0"):
        ps.Config(servers=2, staleness=1, checkpoint_every=5)
    assert ps.fits_world(3, mode="sync", crash_rank=0, crash_at=5)
    assert not ps.fits_world(3, mode="sync", slow_rank=3, delay=0.01)
    assert not ps.fits_world(2, servers=2)
    with pytest.raises(dl.WorldSizeError, match=r"train cannot run on 3 rank\(s\).*runs on: 4, 5"):
        dl.launch(ps.train, world_size=3, slow_rank=3, delay=0.01)
