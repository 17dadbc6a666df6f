"""The bytes of a training step, measured on the tiny GPT, against their formulas (parallel/memory.py): parameters,
gradients and Adam's state exactly; the activations autograd saves exactly, layer by layer, at several sizes."""

import pytest

from distlab.gpt import GPTConfig, gpt
from distlab.parallel import memory

SIZES = [  # (config, batch): width, depth, heads, sequence and batch all moved
    (GPTConfig(block_size=16, d_model=32, n_head=4, n_layer=2), 3),
    (GPTConfig(), 8),
    (GPTConfig(block_size=48, d_model=96, n_head=6, n_layer=3), 2),
]


@pytest.fixture(scope="module")
def step():
    """One fp32 Adam step measured whole (the profiler's allocation records too), at the notebook's size."""
    cfg, batch = SIZES[1]
    return cfg, batch, memory.measure_step(cfg, batch)


def test_parameter_count_is_the_formula():
    for cfg, _ in SIZES:
        assert memory.n_params(cfg) == sum(p.numel() for p in gpt(cfg).parameters())


def test_parameters_gradients_and_adam_state_are_16_bytes_per_parameter_in_fp32(step):
    cfg, _, measured = step
    for kind in ("params", "grads", "optimizer"):
        assert measured.measured[kind] == measured.formula[kind], kind
    assert sum(measured.measured[k] for k in ("params", "grads", "optimizer")) == 16 * memory.n_params(cfg)
    assert measured.measured["activations"] == measured.formula["activations"]


@pytest.mark.parametrize("cfg, batch", SIZES, ids=lambda s: getattr(s, "d_model", s))
def test_saved_activations_equal_the_formula_layer_by_layer(cfg, batch):
    """Tolerance zero: every saved tensor is accounted for (a missed one would show as a difference of its size)."""
    assert memory.saved_activations(cfg, batch) == memory.activation_bytes(cfg, batch)


def test_activations_grow_with_batch_linearly_and_with_sequence_quadratically_in_attention():
    """b·h·s² of the softmax is the one term quadratic in s: doubling s more than doubles a block's bytes."""
    one = memory.block_activation_bytes(4, 32, 64, 4)
    assert memory.block_activation_bytes(8, 32, 64, 4) - 32 * 32 == 2 * (one - 32 * 32)
    assert memory.block_activation_bytes(4, 64, 64, 4) > 2 * one


def test_the_step_peak_holds_the_activations_and_less_than_activations_plus_gradients_more(step):
    """Backward frees activations as gradients arrive: the peak is at least the activations, and its excess
    (temporaries) is smaller than the gradients plus the logits' gradient."""
    cfg, batch, measured = step
    logits = 4 * batch * cfg.block_size * cfg.vocab_size
    assert 0 < measured.measured["temporaries"] < measured.measured["grads"] + 2 * logits


def test_mixed_precision_adam_holds_16_bytes_per_parameter():
    """bf16 weights (2) and gradients (2), fp32 master weights (4), m (4) and v (4): measured from the tensors."""
    cfg = GPTConfig()
    held = memory.mixed_precision_state(cfg)
    assert held == memory.state_bytes_formula(memory.n_params(cfg), "mixed")
    assert sum(held.values()) == 16 * memory.n_params(cfg)


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="precision must be one of"):
        memory.state_bytes_formula(10, "fp8")
