"""Gradient compression: error feedback loses nothing, bytes are counted right, ours equals torch's."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import distlab as dl
from distlab.communication import compression
from distlab.communication.compression import TopK

PARAMS = 64 * 64 + 64 + 64 * 10 + 10  # dl.models.mlp(64, 64, 10)


def test_error_feedback_keeps_what_top_k_did_not_send():
    """After every step: everything sent so far + the residual = every gradient so far."""
    topk, gen = TopK(ratio=0.05), torch.Generator().manual_seed(0)
    sent, total = torch.zeros(200), torch.zeros(200)
    for _ in range(10):
        grad = torch.randn(200, generator=gen)
        values, indices = topk.compress(grad)
        assert len(values) == len(indices) == 10
        sent += TopK.decompress(values, indices, 200)
        total += grad
        torch.testing.assert_close(sent + topk.residual, total)
    assert topk.payload_bytes(200) == 10 * (4 + 4)


def test_top_k_sends_the_largest_entries():
    values, indices = TopK(ratio=0.5).compress(torch.tensor([0.1, -5.0, 2.0, 0.3]))
    assert sorted(indices.tolist()) == [1, 2] and sorted(values.tolist()) == [-5.0, 2.0]
    with pytest.raises(ValueError, match="ratio must be in"):
        TopK(ratio=0.0)


CONFIGS = [{"method": "none"}, {"method": "fp16"}, {"method": "bf16"}, {"method": "topk", "ratio": 0.01},
           {"method": "topk", "ratio": 0.01, "error_feedback": False}, {"method": "powersgd", "rank": 1}]


@pytest.fixture(scope="module")
def compared():
    return dl.launch(compression.compare_compression, world_size=2, configs=CONFIGS, steps=150, timeout=240).results


@pytest.mark.timeout(300)
def test_bytes_per_step_are_what_each_method_sends(compared):
    none, fp16, bf16, topk, _, power = compared[0]
    assert set(none["bytes_per_step"]) == {4 * PARAMS}
    assert set(fp16["bytes_per_step"]) == set(bf16["bytes_per_step"]) == {2 * PARAMS}  # half of float32
    assert set(topk["bytes_per_step"]) == {TopK(0.01).payload_bytes(PARAMS)}  # 48 values + 48 indices
    # PowerSGD: 2 plain steps, then P and Q of both weight matrices (rank 1) and the biases, uncompressed.
    assert power["bytes_per_step"][:2] == [4 * PARAMS] * 2
    assert set(power["bytes_per_step"][2:]) == {4 * ((64 + 64) + (10 + 64) + 64 + 10)}
    assert [r["bytes"] for r in compared[0]] == [r["bytes"] for r in compared[1]]


@pytest.mark.timeout(300)
def test_compression_keeps_accuracy_and_error_feedback_is_what_makes_top_k_work(compared):
    by_method = {(r["method"], r.get("error_feedback", True)): r["accuracy"] for r in compared[0]}
    baseline = by_method[("none", True)]
    assert baseline > 0.85
    for method in ("fp16", "bf16", "topk", "powersgd"):
        assert by_method[(method, True)] > baseline - 0.05, method
    assert by_method[("topk", False)] < by_method[("topk", True)] - 0.2  # 1% without feedback: barely learns
    assert [r["accuracy"] for r in compared[0]] == [r["accuracy"] for r in compared[1]]  # replicas agree


def fp16_ours_and_torchs(ctx, steps=20):
    """The same training with our fp16 hook and with torch's fp16_compress_hook."""
    finals = []
    for ours in (True, False):
        torch.manual_seed(0)
        x, y, _, _ = dl.data.digits(ctx.rank, ctx.world_size)
        model = DDP(dl.models.mlp(64, 16, 10))
        model.register_comm_hook(None,
                                 compression.cast_hook(torch.float16) if ours else default_hooks.fp16_compress_hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(steps):
            loss = F.cross_entropy(model(x[step * 16:(step + 1) * 16]), y[step * 16:(step + 1) * 16])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        finals.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    return (finals[0] - finals[1]).abs().max().item()


@pytest.mark.timeout(120)
def test_our_fp16_hook_equals_torchs_fp16_compress_hook():
    assert dl.launch(fp16_ours_and_torchs, world_size=2, timeout=60).results == [0.0, 0.0]


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        compression.register(None, "zip")
