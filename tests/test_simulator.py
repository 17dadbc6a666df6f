"""The simulator (parallel/simulator.py): its prediction of this machine's data-parallel step against the step
measured on real gloo ranks, and its analytic pieces against the formulas the notebooks derive."""

import pytest

import distlab as dl
from distlab.communication import cost
from distlab.gpt import GPTConfig
from distlab.parallel import memory, pipeline
from distlab.parallel import simulator as sim

SEVEN_B = sim.MODELS["7B"]


def test_the_prediction_of_this_machines_data_parallel_step_is_within_35_percent_of_the_measured_step():
    """Calibrated on the same ranks: per-layer forward+backward and the rest of a local step (the slowest rank's),
    alpha and beta fitted to gloo's all-reduce; the step with its all-reduce measured taking turns with the local
    one. On 2 shared cores the ratio ran from 0.95 to 1.15 over four runs: held to ±35%."""
    run = dl.launch(sim.calibrate, world_size=2, timeout=120)
    c = run.results[0]
    link = sim.measured_link(c["alpha"], c["beta"])
    predicted = sim.data_parallel_seconds(c["layer_seconds"], c["grad_bytes"], 2, link, c["other_seconds"])
    assert predicted / c["step_seconds"] == pytest.approx(1.0, abs=0.35), (predicted, c["step_seconds"])


@pytest.mark.parametrize("n", [2, 4, 8, 64])
def test_the_ring_all_reduce_term_is_notebook_02s_alpha_beta_cost(n):
    link = sim.LINKS["infiniband"]
    numel = 1 << 20
    expected = cost.predict_seconds(link.alpha, link.beta, cost.message_rounds("ring", n),
                                    cost.critical_bytes("ring", numel, 4, n))
    assert sim.ring_all_reduce_seconds(4 * numel, n, link) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (8, 32)])
def test_pipeline_compute_is_stretched_by_the_bubble(pp, m):
    """With the network free, compute·(1 - bubble) is the bubble-free time, bubble = (p-1)/(m+p-1)."""
    free = sim.Link("free", 0.0, float("inf"))
    plan = sim.Plan(dp=1, pp=pp, micro_batches=m)
    p = sim.predict(SEVEN_B, plan, global_batch=m, inter=free)
    assert sim.bubble_fraction(pp, m) == pytest.approx(pipeline.predicted_bubble(pp, m))
    no_bubble = SEVEN_B.n_layer * SEVEN_B.layer_flops(1) / sim.H100.flops * m / pp
    assert p.compute * (1 - sim.bubble_fraction(pp, m)) == pytest.approx(no_bubble, rel=1e-12)


def test_memory_on_one_gpu_is_the_memory_modules_formula():
    cfg = GPTConfig(block_size=128, d_model=256, n_head=8, n_layer=4)
    model = sim.Model(cfg.n_layer, cfg.d_model, cfg.n_head, cfg.block_size, cfg.vocab_size)
    got = sim.memory_per_gpu(model, sim.Plan(), micro_batch=8)
    state = memory.state_bytes_formula(memory.n_params(cfg), "mixed")
    assert {k: got[k] for k in state} == pytest.approx(state)
    assert got["activations"] == 4 * memory.block_activation_bytes(8, 128, 256, 8, element=2)


@pytest.mark.parametrize("stage, divided", [(0, ()), (1, ("optimizer",)), (2, ("optimizer", "grads")),
                                            (3, ("optimizer", "grads", "params"))])
def test_zero_stages_divide_by_the_data_parallel_degree_what_they_shard(stage, divided):
    one = sim.memory_per_gpu(SEVEN_B, sim.Plan(dp=1), 1)
    many = sim.memory_per_gpu(SEVEN_B, sim.Plan(dp=8, zero=stage), 1)
    for kind in ("params", "grads", "optimizer"):
        assert many[kind] == pytest.approx(one[kind] / (8 if kind in divided else 1))


def test_zero3_communicates_1_5_times_data_parallelism():
    link = sim.Link("bandwidth only", 0.0, 50e9)
    plain, zero3 = (sim.predict(SEVEN_B, sim.Plan(dp=64, zero=z, overlap=False), 64, inter=link) for z in (0, 3))
    assert zero3.exposed["data"] == pytest.approx(1.5 * plain.exposed["data"])


def test_from_8_to_4096_gpus_data_parallel_efficiency_falls_and_a_70b_model_needs_sharding():
    efficiencies = [sim.predict(SEVEN_B, sim.Plan(dp=n, zero=1), global_batch=n).efficiency
                    for n in (8, 64, 512, 4096)]
    assert all(0 < e <= 1 for e in efficiencies)
    assert efficiencies == sorted(efficiencies, reverse=True) and efficiencies[-1] < efficiencies[0]
    seventy = sim.MODELS["70B"]
    assert not sim.predict(seventy, sim.Plan(dp=512), 512).fits  # 16 bytes × 70e9 parameters on each GPU
    plans = sim.best_plans(seventy, 512, global_batch=1024)
    assert plans and all(p.zero == 3 or p.tp * p.pp > 1 for p, _ in plans)


def test_an_impossible_plan_is_refused_by_name():
    with pytest.raises(ValueError, match="zero must be"):
        sim.Plan(zero=4)
    with pytest.raises(ValueError, match="global_batch=4 is too small"):
        sim.predict(SEVEN_B, sim.Plan(dp=8), global_batch=4)
