"""Distributed inference: pipelined serving and tensor-parallel inference answer like the unsplit model."""

from types import SimpleNamespace

import pytest
import torch

import distlab as dl
from distlab import gpt
from distlab.parallel import inference
from distlab.parallel import tensor as tp

N = 24


def unsplit_logits(n=N):
    with torch.no_grad():
        return gpt.gpt(gpt.GPTConfig(), 0)(inference.requests(n))[:, -1]


@pytest.mark.timeout(120)
def test_pipelined_serving_answers_like_the_unsplit_model():
    for stages, micro_batch in [(4, 4), (2, 8), (1, 24)]:
        results = dl.launch(inference.serve_pipelined, world_size=4, timeout=90, n_requests=N,
                            micro_batch=micro_batch, stages=stages).results
        torch.testing.assert_close(results[stages - 1]["logits"], unsplit_logits(), atol=1e-5, rtol=0)
        for stage, r in enumerate(results):  # every micro-batch passes every stage once; idle ranks do nothing
            assert [e["micro"] for e in r["events"]] == (list(range(N // micro_batch)) if stage < stages else [])


def test_latency_and_throughput_from_the_timeline():
    events = [dict(stage=0, micro=0, start=0.0, end=1.0), dict(stage=1, micro=0, start=1.0, end=2.0),
              dict(stage=0, micro=1, start=1.0, end=2.0), dict(stage=1, micro=1, start=2.0, end=3.0)]
    # micro-batch 0: 0 -> 2 s; micro-batch 1: 1 -> 3 s; 8 requests in 3 s
    assert inference.latency_throughput(events, n_requests=8) == {"latency_ms": 2000.0, "throughput": 8 / 3}


@pytest.mark.timeout(120)
def test_tensor_parallel_inference_of_a_block_equals_the_unsharded_block():
    with torch.no_grad():
        expected = gpt.gpt(gpt.GPTConfig(n_layer=1), 0)[1](tp.block_input(4))
    results = dl.launch(inference.tp_block_inference, world_size=4, timeout=90, batch=4).results
    for r in results:
        torch.testing.assert_close(r["out"], expected, atol=1e-5, rtol=0)
        assert r["all_reduces"] == 2  # forward only: one after attention, one after the MLP
        assert 0.25 < r["weight_share"] < 0.3  # a quarter of the matrices; LayerNorms and row biases replicated


def test_bad_micro_batch_and_stages_are_refused_by_name():
    with pytest.raises(ValueError, match="micro_batch=0"):
        inference.serve_pipelined(None, n_requests=8, micro_batch=0)
    with pytest.raises(dl.WorldSizeError, match="`stages` ranks serve .* runs on: 5, 6, 7"):  # before any rank starts
        dl.launch(inference.serve_pipelined, world_size=4, timeout=60, stages=5)
    with pytest.raises(ValueError, match="stages=5"):
        inference.serve_pipelined(SimpleNamespace(rank=0, world_size=4), n_requests=8, stages=5)


def test_world_sizes_that_cannot_serve_are_refused_before_any_process_starts(tmp_path):
    with pytest.raises(dl.WorldSizeError, match=r"tp_block_inference cannot run on 3 rank\(s\).* runs on: 1, 2, 4\."):
        dl.launch(inference.tp_block_inference, world_size=3, runs_root=str(tmp_path))
    with pytest.raises(dl.WorldSizeError, match=r"serve_pipelined cannot run on 7 rank\(s\).* on: 1, 2, 3, 4, 5, 6\."):
        dl.launch(inference.serve_pipelined, world_size=7, runs_root=str(tmp_path))
    with pytest.raises(dl.WorldSizeError, match=r"With these arguments it runs on: 3, 4, 5, 6, 7, 8,"):  # 3 stages
        dl.launch(inference.serve_pipelined, world_size=2, stages=3, runs_root=str(tmp_path))
    assert not any(tmp_path.iterdir())
