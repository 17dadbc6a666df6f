"""Memory, time and communication traded within a step (parallel/overlap.py), measured: checkpointing holds less and
takes longer, bf16 autocast saves smaller tensors and reaches the same loss, accumulation all-reduces once per step,
bucketed all-reduces start during backward, by hand and in DDP, and FSDP2's prefetch issues the next unit's
all-gather before the current layer's forward ends (on real gloo ranks)."""

import pytest

import distlab as dl
from distlab.gpt import GPTConfig
from distlab.parallel import memory
from distlab.parallel import overlap as ov

CFG, BATCH = GPTConfig(), 16


@pytest.fixture(scope="module")
def recompute():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; threads fight on a shared machine
    yield ov.recompute_effect(CFG, BATCH, repeats=7)
    torch.set_num_threads(threads)


def test_checkpointing_holds_only_each_blocks_input(recompute):
    """Plain: what autograd saves (memory.activation_bytes). Checkpointed: the embedding's and head's share plus one
    b·s·d input per block. Both within 2% (the profiler also sees the loss and small buffers)."""
    formula = memory.activation_bytes(CFG, BATCH)
    inputs = CFG.n_layer * 4 * BATCH * CFG.block_size * CFG.d_model
    assert recompute["plain"]["held_bytes"] == pytest.approx(sum(formula.values()), rel=0.02)
    assert recompute["checkpointed"]["held_bytes"] == pytest.approx(formula["embedding"] + formula["head"] + inputs,
                                                                    rel=0.02)


def test_checkpointing_costs_time(recompute):
    """The blocks' forwards run twice: forward+backward takes about 4/3 as long in FLOPs (CPU seconds, median of 7,
    taking turns; measured 1.4-1.5×): held to more than 1.1×."""
    assert recompute["checkpointed"]["seconds"] > 1.1 * recompute["plain"]["seconds"]


def test_bf16_autocast_saves_smaller_tensors_and_reaches_the_same_loss(one_torch_thread):
    """Matmul inputs and outputs saved in bf16 (2 bytes), LayerNorm and softmax kept in fp32: well under fp32's bytes;
    after 20 Adam steps both losses have fallen and differ by less than 0.05."""
    small = GPTConfig(n_layer=2)
    out = ov.autocast_effect(small, batch=8, steps=20, repeats=3)
    assert out["bf16"]["saved_bytes"] < 0.8 * out["fp32"]["saved_bytes"]
    fp32, bf16 = out["fp32"]["losses"], out["bf16"]["losses"]
    assert fp32[-1] < fp32[0] - 0.5 and bf16[-1] < bf16[0] - 0.5
    assert abs(fp32[-1] - bf16[-1]) < 0.05


@pytest.fixture(scope="module")
def ranks():
    accumulated = dl.launch(ov.accumulate, world_size=2, timeout=90, cfg=GPTConfig(n_layer=2)).results
    timeline = dl.launch(ov.bucket_timelines, world_size=2, timeout=90, steps=3).results
    return accumulated, timeline


def test_accumulation_all_reduces_only_on_the_last_micro_batch_and_equals_the_big_batch(ranks):
    accumulated, _ = ranks
    for rank in accumulated:
        assert (rank["accumulated"]["params"] - rank["one batch"]["params"]).abs().max() < 1e-6
        assert rank["accumulated"]["all_reduces"] == [0, 0, 0, 1] and rank["one batch"]["all_reduces"] == [1]
        assert rank["accumulated"]["bytes"] == rank["one batch"]["bytes"] == 4 * memory.n_params(GPTConfig(n_layer=2))


def test_overlapped_buckets_start_during_backward_and_average_the_same(ranks):
    """Real timestamps: with overlap every bucket but the last is issued before backward ends; without, none is.
    The averaged gradients are the same bits either way."""
    _, timeline = ranks
    for rank in timeline:
        on, off = rank["overlapped"], rank["after backward"]
        assert (on["grads"] - off["grads"]).abs().max() == 0
        assert on["buckets"] == off["buckets"] > 4
        for spans, overlapped in ((on["spans"], True), (off["spans"], False)):
            backward_end = spans[0]["end"]
            started_early = [s["start"] < backward_end for s in spans[1:]]
            assert sum(started_early) >= (on["buckets"] - 1 if overlapped else 0)
            assert overlapped or not any(started_early)
        assert all(seconds >= 0 for seconds in on["exposed"] + off["exposed"])


def test_ddp_buckets_reduce_every_gradient_byte_each_step_and_match_the_hand_written(ranks):
    """DDP's comm hook sees every gradient byte once per step, in several buckets of bucket_cap_mb = 128 KiB, all but
    the first issued before backward's last gradient; its averaged gradients are the hand-written buckets'."""
    _, timeline = ranks
    grad_bytes = 4 * memory.n_params(GPTConfig(n_layer=6))
    for rank in timeline:
        ddp = rank["DDP"]
        assert ddp["grad_bytes"] == grad_bytes and ddp["bytes"] == [grad_bytes] * 3
        assert ddp["buckets"] > 4
        compute_end = ddp["spans"][0]["end"]
        assert sum(s["start"] < compute_end for s in ddp["spans"][1:]) >= ddp["buckets"] - 1
        assert (ddp["grads"] - rank["overlapped"]["grads"]).abs().max() < 1e-6
        assert all(seconds >= 0 for seconds in ddp["exposed"])


@pytest.fixture(scope="module")
def prefetch():
    return dl.launch(ov.fsdp_prefetch_timeline, world_size=2, timeout=120, steps=1).results


def _gathered_before_previous_layer_ended(spans: list[dict]) -> int:
    """How many blocks' all-gathers (layer j ≥ 2) were issued before layer j−1's forward ended."""
    ends = {s["layer"]: s["end"] for s in spans if s["kind"] == "compute"}
    gathers = {int(s["name"].split()[-1]): s["start"] for s in spans if s["name"].startswith("all-gather layer")}
    return sum(start < ends[layer - 1] for layer, start in gathers.items() if layer >= 2)


def test_fsdp_prefetch_issues_the_next_all_gather_before_the_current_forward_ends(prefetch):
    """Timestamps from FSDP2's own all-gather (set_custom_all_gather) and forward hooks: by default on a CPU each
    block's gather starts after the previous layer's forward has ended; with set_modules_to_forward_prefetch or an
    async unshard from the pre-forward, every following block's is issued before it (n_layer − 1 of them).
    Each block's gather brings all of its parameters (4 bytes each, N = 2 divides every size); the loss is the same."""
    cfg = GPTConfig(n_layer=6)
    block_bytes = 4 * (memory.n_params(GPTConfig(n_layer=1)) - memory.n_params(GPTConfig(n_layer=0)))
    for rank in prefetch:
        assert _gathered_before_previous_layer_ended(rank["default"]["spans"]) == 0
        for mode in ("forward prefetch", "async prefetch"):
            assert _gathered_before_previous_layer_ended(rank[mode]["spans"]) == cfg.n_layer - 1
        for mode in ov.PREFETCH:
            gathers = [s for s in rank[mode]["spans"] if s["name"].startswith("all-gather layer")]
            assert [s["bytes"] for s in gathers] == [block_bytes] * cfg.n_layer
            assert rank[mode]["loss"] == pytest.approx(rank["default"]["loss"], abs=1e-6)
