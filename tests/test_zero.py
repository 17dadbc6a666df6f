"""ZeRO stages 1-3 by hand (parallel/zero.py) and PyTorch's FSDP2 on real gloo ranks, against plain data
parallelism: the same parameters after k Adam steps, the bytes each rank holds as the ZeRO paper says, and the
bytes each step communicates as the ring counts say (stages 1-2 one all-reduce's worth, stage 3 1.5×)."""

import pytest

import distlab as dl
from distlab.gpt import GPTConfig, gpt
from distlab.parallel import zero

STEPS = 3
CFG = GPTConfig(block_size=16, d_model=32, n_head=4, n_layer=2)  # every layer's size divisible by 2 and 4
ROOT = ("0", "3")  # FSDP2's root unit: the embedding and the head (the blocks are units of their own)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}-ranks")
def runs(request):
    n = request.param
    methods = zero.METHODS if n == 2 else ("plain", "zero1", "zero2", "zero3")  # FSDP2 on 2 ranks (its start is slow)
    run = dl.launch(zero.compare, world_size=n, timeout=150, steps=STEPS, cfg=CFG, methods=methods)
    return n, run.results


def _params() -> int:
    return sum(p.numel() for p in gpt(CFG).parameters())


def test_every_stage_and_fsdp2_ends_with_plain_data_parallelisms_parameters(runs):
    """k = 3 Adam steps, on every rank. On 2 ranks every sum adds the same two numbers: bit-identical. On 4 the
    reduce-scatter adds in another order; Adam's step m/√v is about lr in size wherever a gradient is near zero,
    so a rounding there moves a parameter by up to a fraction of lr = 1e-3: held to 5e-5 (measured ~1e-5)."""
    n, results = runs
    tolerance = 0 if n == 2 else 5e-5
    for rank, methods in enumerate(results):
        plain = methods["plain"]["params"]
        assert (plain - results[0]["plain"]["params"]).abs().max() == 0, f"rank {rank}'s replica differs"
        for name, out in methods.items():
            assert (out["params"] - plain).abs().max() <= tolerance, (rank, name)
        assert methods["plain"]["losses"][-1] < methods["plain"]["losses"][0]


def test_bytes_held_per_rank_fall_as_the_zero_paper_says(runs):
    """16P → 4P + 4P + 8P/N → 4P + 12P/N → 16P/N (fp32 Adam; P padded to a multiple of N per layer)."""
    n, results = runs
    for methods in results:
        assert methods["plain"]["held"] == zero.zero_bytes_formula(_params(), n, stage=0)
        totals = [sum(methods["plain"]["held"].values())]
        for stage in zero.STAGES:
            out = methods[f"zero{stage}"]
            assert out["held"] == zero.zero_bytes_formula(out["padded_params"], n, stage), stage
            totals.append(sum(out["held"].values()))
        assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
        assert totals[-1] * n == 16 * methods["zero3"]["padded_params"]
        if "fsdp2" in methods:
            assert methods["fsdp2"]["held"] == methods["zero3"]["held"]  # every layer's rows split evenly


def test_bytes_sent_per_step_equal_the_ring_counts(runs):
    """Every collective's buffer recorded as it ran; a ring sends (N-1)/N of an all-gather's or reduce-scatter's
    buffer, twice that for an all-reduce. FSDP2 keeps its root unit gathered from forward to backward: one gather
    of the embedding and head fewer than stage 3 by hand."""
    n, results = runs
    share = (n - 1) / n
    root = sum(p.numel() for name, p in gpt(CFG).named_parameters() if name.split(".")[0] in ROOT)
    for methods in results:
        sent = {name: sum(c["sent"] for c in out["calls"]) / STEPS for name, out in methods.items()}
        padded = methods["zero1"]["padded_params"]
        assert sent["plain"] == pytest.approx(zero.zero_sent_formula(_params(), n, 0), rel=1e-12)
        for stage in zero.STAGES:
            assert sent[f"zero{stage}"] == pytest.approx(zero.zero_sent_formula(padded, n, stage), rel=1e-12)
        assert sent["zero3"] == pytest.approx(1.5 * sent["zero1"], rel=1e-12)
        if "fsdp2" in sent:
            assert sent["fsdp2"] == pytest.approx(sent["zero3"] - share * 4 * root, rel=1e-12)
        kinds = {name: {c["kind"] for c in out["calls"]} for name, out in methods.items()}
        assert kinds["plain"] == {"all-reduce"} and kinds["zero1"] == {"reduce-scatter", "all-gather"}


def test_an_unknown_stage_is_refused_by_name():
    with pytest.raises(ValueError, match="stage must be one of"):
        zero.ZeRO(gpt(CFG), stage=4)
