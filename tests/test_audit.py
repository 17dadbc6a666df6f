"""The device audit (distlab/audit.py) on real gloo ranks: the suite runs under it (conftest.py), so it
must pass correct rank code and fail code that would break on a GPU, saying which device, which
device was expected, and where."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

import distlab as dl
from distlab import audit, data, models
from distlab.communication import collectives

HERE = __file__.rsplit("/", 1)[-1]
np_to_torch = torch.from_numpy


def line_of(fn, text: str) -> int:
    """The line number in this file of the line of `fn` that contains `text`."""
    lines, first = __import__("inspect").getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


def correct(ctx) -> dict:
    """The idioms that run unchanged on CPU, on a shared GPU and on one GPU per rank."""
    t = torch.ones(4) * (ctx.rank + 1)
    dist.all_reduce(t)
    host = torch.from_numpy(np.arange(4.0)).to(ctx.device)  # host data moved before use
    u = torch.zeros(4, device=ctx.device) + host + torch.zeros_like(t, device=t.device)
    picks = torch.randint(4, (3,), generator=torch.Generator().manual_seed(0), device="cpu")
    u[picks] += 1  # a CPU index into a tensor on ctx.device: torch moves indices itself
    u += torch.randn(4, generator=torch.Generator().manual_seed(1)) * 0  # drawn on the CPU, moved to ctx.device
    order = list(DistributedSampler(range(8), num_replicas=ctx.world_size, rank=ctx.rank, seed=0))
    ring = collectives.ring_all_reduce(torch.full((6,), float(ctx.rank)))
    got = ctx.comm.all_reduce(torch.tensor([1.0, 2.0]))
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(models.mlp(64, 8, 10))
    x, y, _, _ = data.digits(ctx.rank, ctx.world_size)
    xb, yb = next(data.minibatches(x, y, 8, rank=ctx.rank))
    nn.functional.cross_entropy(model(xb), yb).backward()
    return {"device": str(ctx.device), "sum": t.tolist(), "u": u.tolist(), "ring": ring.tolist(), "comm": got.tolist(),
            "grad_device": str(model.module[0].weight.grad.device), "order": order}


def test_correct_rank_code_passes_and_the_job_device_is_spelled_apart():
    results = dl.launch(correct, world_size=2, timeout=120).results
    for r in results:
        assert r["device"] == "cpu:0"  # conftest turned the audit on: the CPU, spelled apart
        assert r["sum"] == [3.0] * 4 and r["ring"] == [1.0] * 6 and r["comm"] == [2.0, 4.0]
        assert r["u"][0] in (0.0, 1.0) and r["u"][3] in (3.0, 4.0) and r["grad_device"] == "cpu"
    assert sorted(results[0]["order"] + results[1]["order"]) == list(range(8))


def made_on_cpu_then_sent(ctx):
    t = torch.ones(4, device="cpu")
    dist.all_reduce(t)


def test_a_cpu_tensor_sent_fails_the_rank_naming_devices_and_lines():
    with pytest.raises(dl.RankFailure) as failure:
        dl.launch(made_on_cpu_then_sent, world_size=2, timeout=60)
    message = str(failure.value)
    assert "DeviceAuditError" in message and "dist.all_reduce" in message
    assert f"{HERE}:{line_of(made_on_cpu_then_sent, 'dist.all_reduce')}" in message  # where it was sent
    assert "made at " in message and f"{HERE}:{line_of(made_on_cpu_then_sent, 'torch.ones')}" in message
    assert "got a tensor on cpu" in message and "ctx.device is cpu:0" in message


def mistakes(ctx) -> dict:
    """Each mistake in turn, caught in the rank: what the audit said about it."""
    g = torch.Generator().manual_seed(0)
    cases = {
        "from_numpy mixed": lambda: torch.from_numpy(np.ones(3, dtype=np.float32)) * torch.ones(3),
        ".cpu() sent by ctx.comm": lambda: ctx.comm.all_reduce(torch.ones(3).cpu()),
        ".to('cpu') into the ring": lambda: collectives.ring_all_reduce(torch.ones(8).to("cpu")),
        "derived from a cpu tensor": lambda: dist.broadcast(torch.zeros(2, device="cpu").float() + 1, src=0),
        "cpu generator onto ctx.device": lambda: torch.randn(3, generator=g, device=ctx.device),
        "cpu generator's explicit cpu draw mixed": lambda: torch.randn(3, generator=g, device="cpu") + torch.ones(3),
    }
    said = {}
    for name, mistake in cases.items():
        try:
            mistake()
            said[name] = None
        except audit.DeviceAuditError as error:
            said[name] = str(error)
    return said


def test_each_kind_of_mistake_is_caught():
    said = dl.launch(mistakes, world_size=2, timeout=60).results[0]
    assert all(said.values()), [name for name, message in said.items() if message is None]
    assert "Tensor.mul (mixed with tensors on ctx.device)" in said["from_numpy mixed"]
    assert "dist.all_reduce" in said[".cpu() sent by ctx.comm"] and "comm.py" in said[".cpu() sent by ctx.comm"]
    assert "collectives.py" in said[".to('cpu') into the ring"]  # where the ring sent it
    assert f"made at {__file__}:{line_of(mistakes, 'ring_all_reduce')}" in said[".to('cpu') into the ring"]
    assert "dist.broadcast" in said["derived from a cpu tensor"]
    assert "torch.randn" in said["cpu generator onto ctx.device"] and "generator on cpu" in said[
        "cpu generator onto ctx.device"]
    assert "Tensor.add (mixed with tensors on ctx.device)" in said["cpu generator's explicit cpu draw mixed"]
    for message in said.values():
        assert f"{HERE}:" in message or "comm.py:" in message or "collectives.py:" in message


def test_the_audit_leaves_torch_as_it_found_it():
    send = dist.all_reduce
    with audit.auditing(torch.device("cpu", 0)) as mode:
        assert dist.all_reduce is not send
        tagged = torch.ones(2, device="cpu")
        assert mode.made_off_device(tagged)[0] == "cpu" and mode.made_off_device(torch.ones(2)) is None
        del tagged
        assert not mode.made  # a tag dies with its tensor
    assert dist.all_reduce is send and torch.from_numpy is np_to_torch
    assert torch.overrides._get_current_function_mode_stack() == []
