"""Collectives written from send/recv compute what torch.distributed's built-ins compute, in place as they do."""

import pytest
import torch
import torch.distributed as dist

import distlab as dl
from distlab.communication import collectives
from distlab.models import largest_difference

SHAPES = [(7,), (3, 5), (2, 3, 4), (1,)]  # sizes 7, 15, 24, 1: not all divisible by 2, 3 or 4


def compare_with_builtin(ctx):
    """Largest difference to the built-in, per (collective, algorithm, shape, op)."""
    diffs = {}
    for shape in SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(ctx.rank))
        for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX):
            expected = x.clone()
            dist.all_reduce(expected, op=op)
            for algorithm in collectives.ALL_REDUCES:
                given = x.clone()
                mine = collectives.all_reduce(given, op=op, algorithm=algorithm)
                diffs[("all_reduce", algorithm, shape, str(op))] = max(  # what it returns, and its argument
                    largest_difference(mine, expected), largest_difference(given, expected))
        src = ctx.world_size - 1
        given, theirs = x.clone(), x.clone()
        mine = collectives.broadcast(given, src=src)
        dist.broadcast(theirs, src=src)
        diffs[("broadcast", "tree", shape, "")] = max(largest_difference(mine, theirs),
                                                      largest_difference(given, theirs))
        mine = collectives.all_gather([torch.empty_like(x) for _ in range(ctx.world_size)], x)
        theirs = [torch.empty_like(x) for _ in range(ctx.world_size)]
        dist.all_gather(theirs, x)
        diffs[("all_gather", "ring", shape, "")] = largest_difference(mine, theirs)
    not_contiguous = torch.arange(12.0).view(3, 4).t() * (ctx.rank + 1)
    expected = not_contiguous.clone()
    dist.all_reduce(expected)
    collectives.ring_all_reduce(not_contiguous)
    diffs[("all_reduce", "ring", "transposed", "")] = largest_difference(not_contiguous, expected)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(ctx.rank))
    sums = [collectives.all_reduce(x.clone(), algorithm=a).tolist() for a in collectives.ALL_REDUCES]
    return diffs, sums


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_hand_written_collectives_equal_the_builtins(world_size):
    run = dl.launch(compare_with_builtin, world_size=world_size, timeout=90)
    for rank, (diffs, _) in enumerate(run.results):
        assert len(diffs) == len(SHAPES) * (2 * 3 + 2) + 1
        wrong = {key: d for key, d in diffs.items() if d > 1e-5}
        assert not wrong, f"rank {rank} differs from torch.distributed: {wrong}"
    # Each chunk is summed once (ring, naive) or by commutative pairs (recursive doubling): every rank
    # ends with the same bits, so replicas cannot drift apart through rounding.
    assert all(sums == run.results[0][1] for _, sums in run.results)


def test_bad_arguments_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="algorithm must be one of"):
        collectives.all_reduce(torch.ones(2), algorithm="butterfly")
    with pytest.raises(ValueError, match="op must be one of"):
        collectives.ring_all_reduce(torch.ones(2), op=dist.ReduceOp.BAND)


def test_the_ring_receives_on_the_tensor_s_device():
    """Its kept receive buffer follows the tensor's dtype and device (a CUDA tensor must not receive into
    host memory); the meta device stands in for a GPU on CPU-only machines."""
    buffer = collectives._scratch(10, torch.empty(3, device="meta", dtype=torch.float16))
    assert buffer.device.type == "meta" and buffer.dtype == torch.float16 and buffer.numel() == 10
    assert collectives._scratch(4, torch.empty(1)).device.type == "cpu"
