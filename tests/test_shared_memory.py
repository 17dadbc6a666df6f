"""The shared-memory all-reduce computes what dist.all_reduce computes, and nobody but the owner can reach it."""

import os

import pytest
import torch
import torch.distributed as dist

import distlab as dl
from distlab.communication import shared_memory
from distlab.communication.shared_memory import SharedMemoryAllReduce
from distlab.models import largest_difference

SIZES = (1, 7, 1000, 100_003)  # 100_003 float64 = 800 KB: four pieces of the 256 KB below
DTYPES = (torch.float32, torch.float64, torch.int64)
OPS = (dist.ReduceOp.SUM, dist.ReduceOp.MAX)


def compare_with_gloo(ctx):
    old_umask = os.umask(0)  # a careless umask must not open the mapping to others
    try:
        shm = SharedMemoryAllReduce(piece=256 << 10)
    finally:
        os.umask(old_umask)
    diffs, sums = {}, []
    for numel in SIZES:
        for dtype in DTYPES:
            x = (torch.randn(numel, generator=torch.Generator().manual_seed(ctx.rank)) * 100).to(dtype)
            for op in OPS:
                expected, given = x.clone().to(ctx.device), x.clone().to(ctx.device)
                dist.all_reduce(expected, op=op)
                returned = shm.all_reduce(given, op=op)
                scale = max(1.0, expected.abs().max().item())
                diffs[(numel, str(dtype), str(op))] = max(largest_difference(returned, expected),
                                                          largest_difference(given, expected)) / scale
                sums.append(given.cpu())
    transposed = (torch.arange(12.0).view(3, 4).t() * (ctx.rank + 1)).to(ctx.device)
    expected = transposed.clone()
    dist.all_reduce(expected)
    diffs["transposed"] = largest_difference(shm.all_reduce(transposed), expected)
    try:
        shm.all_reduce(torch.ones(2), op=dist.ReduceOp.BAND)
        refused = ""
    except ValueError as error:
        refused = str(error)
    shm.close()
    return {"diffs": diffs, "sums": sums, "modes": shm.modes, "path": shm.path, "refused": refused,
            "path_exists": os.path.exists(shm.path), "folder_exists": os.path.exists(os.path.dirname(shm.path))}


@pytest.fixture(scope="module")
def runs():
    """One launch per world size, shared by the tests that read it."""
    done = {}

    def run(world_size):
        if world_size not in done:
            done[world_size] = dl.launch(compare_with_gloo, world_size=world_size, timeout=90)
        return done[world_size]

    return run


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 4])
def test_shared_memory_all_reduce_equals_dist_all_reduce(world_size, runs):
    run = runs(world_size)
    for rank, result in enumerate(run.results):
        assert len(result["diffs"]) == len(SIZES) * len(DTYPES) * len(OPS) + 1
        wrong = {key: d for key, d in result["diffs"].items() if d > 1e-6}  # integers: exactly 0
        assert not wrong, f"rank {rank} differs from dist.all_reduce: {wrong}"
        assert "op must be one of" in result["refused"]
    # Each chunk is reduced once, by one rank: every rank holds the same bits.
    first = run.results[0]["sums"]
    assert all(torch.equal(a, b) for result in run.results for a, b in zip(result["sums"], first))


def test_the_mapping_is_owner_only_and_removed_once_every_rank_mapped_it(runs):
    run = runs(2)
    result = run.results[0]
    assert result["modes"] == (0o700, 0o600)  # folder, file: as created, under umask 0
    assert not any(r["path_exists"] or r["folder_exists"] for r in run.results)
    assert os.path.dirname(os.path.dirname(result["path"])) in ("/dev/shm", "/tmp")


def one_rank_never_joins(ctx):
    from distlab.communication import shared_memory

    shm = SharedMemoryAllReduce(piece=64 << 10)
    shared_memory.WAIT_TIMEOUT = 0.5
    message = ""
    if ctx.rank == 0:
        try:
            shm.all_reduce(torch.ones(100))
        except TimeoutError as error:
            message = str(error)
    dist.barrier()
    shm.close()
    return message


@pytest.mark.skipif(not shared_memory.ORDERED_STORES,
                    reason="flags are waited on only on x86 (total store order); elsewhere the wait is "
                    "gloo's barrier, bounded by the process group's own timeout")
def test_a_rank_waiting_for_a_peer_that_never_comes_gives_up_and_says_for_whom():
    message = dl.launch(one_rank_never_joins, world_size=2, timeout=60).results[0]
    assert "rank 0 waited 0.5 s for rank 1's shared-memory flag to reach 1; it is at 0" in message
