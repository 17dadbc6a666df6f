"""Strong and weak scaling, measured on real gloo ranks: the work per rank falls as 1/N (strong) or stays
flat (weak); Amdahl's law fitted to the speedups reproduces them. Bounds are generous: the cores are shared."""

import pytest

import distlab as dl
from distlab.parallel import scaling

TOTAL, PER_RANK = 512, 256


@pytest.fixture(scope="module")
def measured():
    """The baseline and 2 ranks, strong (total batch 512) and weak (256 per rank)."""
    strong = [scaling.summarize([scaling.single_process_steps(TOTAL)]),
              scaling.summarize(dl.launch(scaling.scaling_steps, world_size=2, total_batch=TOTAL, timeout=120,
                                          quiet=True).results)]
    weak = [scaling.summarize([scaling.single_process_steps(PER_RANK)]),
            scaling.summarize(dl.launch(scaling.scaling_steps, world_size=2, per_rank_batch=PER_RANK, timeout=120,
                                        quiet=True).results)]
    return scaling.speedups(strong), scaling.speedups(weak, weak=True)


@pytest.mark.timeout(240)
def test_strong_scaling_splits_the_work_and_the_batch(measured):
    one, two = measured[0]
    assert (one["batch"], two["batch"]) == (TOTAL, TOTAL // 2)
    assert 0.3 < two["cpu"] / one["cpu"] < 0.9, "half the batch per rank: less compute per rank (1/2 ideal)"
    assert one["comm"] < 1e-3 < two["comm"] + 1e-3, "one process communicates nothing; two all-reduce"


@pytest.mark.timeout(240)
def test_weak_scaling_keeps_the_work_per_rank_flat(measured):
    one, two = measured[1]
    assert one["batch"] == two["batch"] == PER_RANK
    assert 0.6 < two["cpu"] / one["cpu"] < 1.6, "the same batch per rank: about the same compute per rank"
    assert two["efficiency"] == pytest.approx(one["step"] / two["step"])
    assert two["speedup"] == pytest.approx(2 * two["efficiency"])


@pytest.mark.timeout(240)
def test_amdahl_fitted_on_the_measured_speedups_reproduces_them(measured):
    strong = measured[0]
    serial = scaling.fit_serial_fraction([r["world_size"] for r in strong], [r["speedup"] for r in strong])
    for r in strong:
        assert scaling.amdahl(serial, r["world_size"]) == pytest.approx(r["speedup"], rel=1e-9)


def test_the_amdahl_fit_recovers_the_serial_fraction_and_averages_noise():
    sizes = [1, 2, 3, 4, 8]
    assert scaling.fit_serial_fraction(sizes, [scaling.amdahl(0.2, n) for n in sizes]) == pytest.approx(0.2)
    noisy = [scaling.amdahl(0.2, n) * (1.05 if n % 2 else 0.95) for n in sizes]
    fitted = scaling.fit_serial_fraction(sizes, noisy)
    assert 0.1 < fitted < 0.3
    assert all(scaling.amdahl(fitted, n) == pytest.approx(s, rel=0.15) for n, s in zip(sizes, noisy))
    assert scaling.amdahl(0.0, 4) == pytest.approx(4) and scaling.amdahl(1.0, 4) == pytest.approx(1)
    with pytest.raises(ValueError, match="world_size > 1"):
        scaling.fit_serial_fraction([1], [1.0])


def test_scaling_steps_refuses_an_ambiguous_batch():
    with pytest.raises(ValueError, match="exactly one of total_batch"):
        scaling.scaling_steps(None, total_batch=8, per_rank_batch=8)
