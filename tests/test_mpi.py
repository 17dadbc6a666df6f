"""Real MPI (mpi4py over MPICH, started by mpiexec): its all-reduce is right, and timed like the others."""

import pytest

from distlab.communication import mpi


@pytest.mark.timeout(180)
def test_mpi_ranks_all_reduce_and_broadcast_under_mpiexec():
    ranks = mpi.run("hello", world_size=2, timeout=150)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["size"] == 2 for r in ranks)
    assert all(r["sum"] == [3.0] * 4 for r in ranks)  # 1 + 2, on every rank
    assert all(r["token"] == "from rank 0" for r in ranks) and ranks[0]["library"].startswith("MPICH")


@pytest.mark.timeout(180)
def test_mpi_allreduce_is_timed_per_size_by_the_slowest_rank():
    sizes = [4096, 1 << 20]
    ranks = mpi.run("time_allreduce", world_size=2, timeout=150, sizes=sizes, repeats=3)
    rows = ranks[0]["rows"]
    assert [r["bytes"] for r in rows] == sizes and all(r["seconds"] > 0 for r in rows)
    assert rows == ranks[1]["rows"]  # the slowest rank's median, agreed on by both


def test_an_unknown_task_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"task must be one of \('hello', 'time_allreduce'\)"):
        mpi.run("allgather")
