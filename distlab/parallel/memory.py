"""Where the memory of a training step goes: parameters, gradients, optimizer state, activations, and the
temporaries of backward, each measured on the tiny GPT (distlab/gpt.py) and set beside its formula.

The persistent kinds are counted from the tensors that hold them (`p.grad`, the optimizer's state); the
activations are the tensors autograd saves for backward, caught with saved-tensor hooks
(https://pytorch.org/docs/stable/autograd.html#hooks-for-saved-tensors) and counted once per storage; the
peak of a step comes from the profiler's allocation records on CPU (`profile_memory=True`) and from
`torch.cuda.max_memory_allocated` on a GPU. The formulas follow ZeRO (Rajbhandari et al. 2020,
https://arxiv.org/abs/1910.02054: 16 bytes per parameter for mixed-precision Adam) and the activation
count of Korthikanti et al. 2022 (https://arxiv.org/abs/2205.05198), redone for this model: fp32, no dropout.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..comm import nbytes
from ..gpt import GPTConfig, gpt, lm_loss

# bytes per parameter (Rajbhandari et al. 2020, section 3.1): weights, gradients, optimizer state
PRECISIONS = {
    "fp32": {"params": 4, "grads": 4, "optimizer": 8},             # Adam's m and v in fp32
    "mixed": {"params": 2, "grads": 2, "optimizer": 12},           # bf16/fp16 weights and grads; fp32 master, m, v
}


# -- the formulas -------------------------------------------------------------------------------------------

def n_params(cfg: GPTConfig) -> int:
    """Parameters of distlab's GPT: embeddings, 12d² + 13d per block (q, k, v, proj, fc, proj, two LayerNorms),
    the head's LayerNorm and projection."""
    d, v, t = cfg.d_model, cfg.vocab_size, cfg.block_size
    block = 4 * (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    return v * d + t * d + cfg.n_layer * block + 2 * d + d * v + v


def state_bytes_formula(params: int, precision: str = "fp32") -> dict[str, int]:
    """Bytes of parameters, gradients and Adam's state: 16 per parameter in both precisions, split differently."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return {kind: per * params for kind, per in PRECISIONS[precision].items()}


def block_activation_bytes(batch: int, seq: int, d_model: int, n_head: int, element: int = 4) -> int:
    """Bytes one transformer block saves for backward.

    16·b·s·d elements: the block input, LayerNorm outputs (2), q, k, v (3), the heads joined, the mid residual,
    the MLP's 4d pre- and post-GELU (8); b·h·s² for the softmax; 4·b·s for the two LayerNorms' mean and
    1/std; plus the s×s causal mask (1 byte each).
    """
    b, s, d, h = batch, seq, d_model, n_head
    return element * (16 * b * s * d + b * h * s * s + 4 * b * s) + s * s


def activation_bytes(cfg: GPTConfig, batch: int, element: int = 4) -> dict[str, int]:
    """Bytes autograd saves for backward, by layer: embedding (token ids and positions, int64), each block,
    the head (LayerNorm input and output, its statistics, log-softmax of the logits, the targets and the loss's
    one-number total weight)."""
    b, s, d, v = batch, cfg.block_size, cfg.d_model, cfg.vocab_size
    out = {"embedding": 8 * b * s + 8 * s}
    out.update({f"block {i}": block_activation_bytes(b, s, d, cfg.n_head, element) for i in range(cfg.n_layer)})
    out["head"] = element * (2 * b * s * d + 2 * b * s + b * s * v + 1) + 8 * b * s
    return out


# -- measuring --------------------------------------------------------------------------------------------------

def tensor_bytes(tensors) -> int:
    return sum(nbytes(t) for t in tensors if torch.is_tensor(t))


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (Adam's m and v; its step counters are scalars of 4 bytes each)."""
    return sum(nbytes(t) for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.numel() > 1)


class SavedTensors:
    """The tensors autograd saves for backward while inside `watching`, counted once per storage, parameters left
    out (they are counted as parameters), grouped by the layer that was running when they were saved."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.by_layer: dict[str, int] = {}
        self._seen: set[int] = set()
        self._layer = "outside"

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.by_layer[self._layer] = self.by_layer.get(self._layer, 0) + storage.nbytes()
        return tensor

    def _enter(self, name: str):
        def hook(module, args):
            self._layer = name
        return hook

    @contextmanager
    def watching(self, names: list[str]):
        self._seen = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        handles = [layer.register_forward_pre_hook(self._enter(name)) for name, layer in zip(names, self.model)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
                yield self
        finally:
            for handle in handles:
                handle.remove()

    @property
    def total(self) -> int:
        return sum(self.by_layer.values())


def layer_names(cfg: GPTConfig) -> list[str]:
    return ["embedding", *[f"block {i}" for i in range(cfg.n_layer)], "head"]


def allocated(run) -> tuple[int, int]:
    """Bytes allocated above the starting point while `run()` runs, at its peak and at its end: the CPU profiler's
    per-op allocation records laid end to end in time (an op's own peak inside it is not seen: a lower bound)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        run()
    finally:
        with _quiet_stderr():
            prof.stop()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, live


@contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to /dev/null: kineto prints a 'USDT ... profiler_start/stop' line from C++ at each
    start and stop, which a rank would stream into the notebook's cell."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cuda_peak(run, device: torch.device) -> int:
    """Bytes allocated on the GPU above the starting point at the peak of `run()`."""
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def saved_activations(cfg: GPTConfig, batch: int, seed: int = 0) -> dict[str, int]:
    """Bytes autograd saves for backward in one forward of gpt(cfg) on a random batch, by layer."""
    model = gpt(cfg, seed)
    x, y = next(_random_batch(cfg, batch, seed))
    saved = SavedTensors(model)
    with saved.watching(layer_names(cfg)):
        lm_loss(model(x), y)
    return dict(saved.by_layer)


@dataclass
class StepMemory:
    """One training step's bytes by kind, measured, and the formula's, for the same model and batch."""

    measured: dict[str, int]
    formula: dict[str, int]
    activations_by_layer: dict[str, int]
    activations_formula_by_layer: dict[str, int]
    params: int


def measure_step(cfg: GPTConfig, batch: int, device: torch.device | str = "cpu", seed: int = 0) -> StepMemory:
    """One fp32 Adam step of the tiny GPT: parameters, gradients and Adam's state from the tensors that hold them,
    activations from the saved-tensor hooks, and the step's peak above the persistent state; temporaries are
    what the peak holds beyond the saved activations (gradients as they arrive, the backward's own buffers)."""
    device = torch.device(device)
    model = gpt(cfg, seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = (t.to(device) for t in next(_random_batch(cfg, batch, seed)))
    saved = SavedTensors(model)

    def forward_backward():
        with saved.watching(layer_names(cfg)):
            loss = lm_loss(model(x), y)
        loss.backward()

    peak = cuda_peak(forward_backward, device) if device.type == "cuda" else allocated(forward_backward)[0]
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    measured = {"params": tensor_bytes(model.parameters()), "grads": tensor_bytes(p.grad for p in model.parameters()),
                "optimizer": optimizer_bytes(optimizer), "activations": saved.total,
                "temporaries": max(0, peak - saved.total)}
    by_layer = activation_bytes(cfg, batch)
    formula = {**state_bytes_formula(n_params(cfg)), "activations": sum(by_layer.values())}
    return StepMemory(measured, formula, dict(saved.by_layer), by_layer, params)


def mixed_precision_state(cfg: GPTConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Mixed-precision Adam's persistent bytes, measured after one step: bf16 weights and gradients in the model,
    an fp32 master copy that Adam updates (its m and v fp32 too). 2 + 2 + 4 + 8 = 16 bytes per parameter."""
    model = gpt(cfg, seed)
    master = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    model = model.to(dtype)
    optimizer = torch.optim.Adam(master, lr=1e-3)
    x, y = next(_random_batch(cfg, 2, seed))
    lm_loss(model(x).float(), y).backward()
    for p, m in zip(model.parameters(), master):
        m.grad = p.grad.float()
    optimizer.step()
    for m in master:
        m.grad = None  # the fp32 copy of the gradient lives only for the step
    return {"params": tensor_bytes(model.parameters()), "grads": tensor_bytes(p.grad for p in model.parameters()),
            "optimizer": tensor_bytes(master) + optimizer_bytes(optimizer)}


def _random_batch(cfg: GPTConfig, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield tuple(torch.randint(cfg.vocab_size, (batch, cfg.block_size), generator=generator) for _ in "xy")
