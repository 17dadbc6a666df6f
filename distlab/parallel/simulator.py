"""A step-time and memory simulator for data, tensor, pipeline and ZeRO/FSDP parallelism and their products, from
8 to 4,096 GPUs: measured per-layer compute times and an alpha-beta model per link (notebook 02's cost model).

A step is compute, stretched by the pipeline's bubble, plus the communication that is not hidden behind it:
  compute   (m + p - 1) · t_micro, t_micro = (L/p) · t_layer(b) / t  (t_layer from a measurement, scaled by FLOPs)
  tensor    4 all-reduces per layer and micro-batch of b·s·d activations (Megatron-LM, Shoeybi et al. 2019,
            https://arxiv.org/abs/1909.08053), on the critical path
  pipeline  one send forward and one back per micro-batch and stage boundary (GPipe / 1F1B bubble (p-1)/(m+p-1))
  data      ring all-reduce of the gradients, 2(N-1)/N·S (ZeRO-3: 3(N-1)/N·S), overlapped with backward
Memory per GPU follows parallel/memory.py: 16 bytes per parameter (mixed precision) divided by t·p and by the
data-parallel degree for what ZeRO shards; activations per block divided by t, held for up to p micro-batches.

The links' constants, one direction (bandwidth from the public specifications; latency alpha is the order of
magnitude NCCL's own tests report per hop, not a specification):
- NVLink 4 on H100 SXM: 900 GB/s total per GPU, 450 GB/s each way
  (https://www.nvidia.com/en-us/data-center/h100/), alpha ≈ 2 µs.
- InfiniBand NDR: 400 Gb/s per port = 50 GB/s, one port per GPU in a DGX H100
  (https://www.nvidia.com/en-us/networking/quantum2/), alpha ≈ 5 µs.
- Ethernet 100GBASE (IEEE 802.3, https://www.ieee802.org/3/): 12.5 GB/s, alpha ≈ 20 µs (TCP through the kernel).
The GPU: H100 SXM, 989 TFLOP/s dense bf16 (same datasheet), 80 GB, used at a model FLOP utilisation of 40%.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..gpt import GPTConfig
from . import memory


@dataclass(frozen=True)
class Link:
    name: str
    alpha: float      # seconds per message
    bandwidth: float  # bytes per second, one direction

    @property
    def beta(self) -> float:
        return 1 / self.bandwidth


LINKS = {
    "nvlink": Link("NVLink 4", 2e-6, 450e9),
    "infiniband": Link("InfiniBand NDR", 5e-6, 50e9),
    "ethernet": Link("100 Gb Ethernet", 20e-6, 12.5e9),
}


@dataclass(frozen=True)
class Device:
    name: str
    flops: float          # FLOP/s the model's layers reach (peak × utilisation)
    memory: float         # bytes
    per_node: int = 8     # GPUs behind one NVLink switch


H100 = Device("H100 SXM at 40% MFU", 0.4 * 989e12, 80e9)


@dataclass(frozen=True)
class Model:
    """A GPT like distlab's, any size: L blocks of width d, h heads, sequence s, vocabulary V."""

    n_layer: int
    d_model: int
    n_head: int
    seq: int = 2048
    vocab: int = 50257

    @property
    def params(self) -> int:
        return memory.n_params(GPTConfig(self.vocab, self.seq, self.d_model, self.n_head, self.n_layer))

    def layer_flops(self, batch: int) -> float:
        """FLOPs of one block's forward and backward: 6 per weight and token, plus attention's 12·s·d per token."""
        tokens, d = batch * self.seq, self.d_model
        return 6 * tokens * 12 * d * d + 12 * tokens * self.seq * d


MODELS = {"1.3B": Model(24, 2048, 16), "7B": Model(32, 4096, 32), "70B": Model(80, 8192, 64),
          "175B": Model(96, 12288, 96)}


@dataclass(frozen=True)
class Plan:
    """How the GPUs are used: data × tensor × pipeline degrees, ZeRO stage (3 = FSDP), micro-batches, recomputation."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro_batches: int = 1
    recompute: bool = False
    overlap: bool = True

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    def __post_init__(self):
        for name in ("dp", "tp", "pp", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero must be 0, 1, 2 or 3, got {self.zero!r}")


# -- the pieces, each one formula ---------------------------------------------------------------------------

def ring_all_reduce_seconds(nbytes: float, n: int, link: Link, volume: float = 2.0) -> float:
    """Ring all-reduce over n ranks: 2(n-1) messages, 2(n-1)/n·S bytes per rank (`volume` 3 for ZeRO-3's gathers)."""
    if n == 1:
        return 0.0
    return volume * (n - 1) * link.alpha + volume * (n - 1) / n * nbytes * link.beta


def bubble_fraction(pp: int, micro_batches: int) -> float:
    return (pp - 1) / (micro_batches + pp - 1)


def _link_for(span: int, device: Device, inter: Link) -> Link:
    """NVLink while a group fits in one node, else the network between nodes."""
    return LINKS["nvlink"] if span <= device.per_node else inter


def memory_per_gpu(model: Model, plan: Plan, micro_batch: int, precision: str = "mixed") -> dict[str, float]:
    """Bytes per GPU by kind: ZeRO divides by dp what its stage shards; t·p split the weights; activations per
    block (parallel/memory.py's formula, 2-byte elements in mixed precision) divided by t, p micro-batches in
    flight on stage 0 (1F1B)."""
    per = memory.state_bytes_formula(1, precision)
    shards = {"params": plan.dp if plan.zero >= 3 else 1, "grads": plan.dp if plan.zero >= 2 else 1,
              "optimizer": plan.dp if plan.zero >= 1 else 1}
    local = model.params / (plan.tp * plan.pp)
    out = {kind: per[kind] * local / shards[kind] for kind in per}
    layers = model.n_layer / plan.pp
    element = 2 if precision == "mixed" else 4
    block = memory.block_activation_bytes(micro_batch, model.seq, model.d_model, model.n_head, element) / plan.tp
    in_flight = min(plan.pp, plan.micro_batches)
    if plan.recompute:  # only each block's input is kept; one block's activations are rebuilt at a time
        out["activations"] = in_flight * layers * element * micro_batch * model.seq * model.d_model + block
    else:
        out["activations"] = in_flight * layers * block
    return out


@dataclass
class Prediction:
    seconds: float
    compute: float
    exposed: dict[str, float]
    memory: dict[str, float]
    efficiency: float
    fits: bool

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())


def predict(model: Model, plan: Plan, global_batch: int, device: Device = H100, inter: Link = LINKS["infiniband"],
            layer_seconds: float | None = None) -> Prediction:
    """Step time, its exposed communication by kind, memory per GPU and scaling efficiency of one plan.

    `layer_seconds` is a measured forward+backward of one block at the micro-batch size (else FLOPs / device);
    efficiency is the time the step's FLOPs take at the device's rate on all GPUs over the predicted time."""
    per_replica = global_batch / plan.dp
    micro = per_replica / plan.micro_batches
    if micro < 1:
        raise ValueError(f"global_batch={global_batch} is too small for dp={plan.dp} × {plan.micro_batches} "
                         "micro-batches: each micro-batch needs a sequence")
    t_layer = layer_seconds if layer_seconds is not None else model.layer_flops(micro) / device.flops
    t_layer *= 4 / 3 if plan.recompute else 1  # the forward (a third of forward+backward) runs twice
    t_micro = model.n_layer / plan.pp * t_layer / plan.tp
    compute = (plan.micro_batches + plan.pp - 1) * t_micro
    activation = 2 * micro * model.seq * model.d_model  # bf16 bytes of one micro-batch's hidden states
    tp_link = _link_for(plan.tp, device, inter)
    tensor = plan.micro_batches * model.n_layer / plan.pp * 4 * ring_all_reduce_seconds(activation, plan.tp, tp_link)
    pp_link = _link_for(plan.tp * plan.pp, device, inter)
    pipeline = 2 * (plan.micro_batches + plan.pp - 2) * (pp_link.alpha + activation * pp_link.beta) * (plan.pp > 1)
    grads = 2 * model.params / (plan.tp * plan.pp)
    dp_link = _link_for(plan.gpus, device, inter)
    data = ring_all_reduce_seconds(grads, plan.dp, dp_link, volume=3.0 if plan.zero == 3 else 2.0)
    hidden = 2 / 3 * t_micro if plan.overlap else 0.0  # the last micro-batch's backward
    exposed = {"tensor": tensor, "pipeline": pipeline, "data": max(0.0, data - hidden)}
    seconds = compute + sum(exposed.values())
    ideal = model.n_layer * model.layer_flops(global_batch) / (plan.gpus * device.flops)
    mem = memory_per_gpu(model, plan, micro)
    return Prediction(seconds, compute, exposed, mem, ideal / seconds, sum(mem.values()) <= device.memory)


def data_parallel_seconds(layer_seconds: list[float], grad_bytes: int, n: int, link: Link,
                          other_seconds: float = 0.0) -> float:
    """This machine's plain data-parallel step: every layer's forward+backward, then one all-reduce of the
    gradients (not overlapped), plus what else the step does (loss, optimizer)."""
    return sum(layer_seconds) + other_seconds + ring_all_reduce_seconds(grad_bytes, n, link)


def best_plans(model: Model, gpus: int, global_batch: int, device: Device = H100,
               inter: Link = LINKS["infiniband"]) -> list[tuple[Plan, Prediction]]:
    """Every plan over `gpus` (powers of two, tp within a node, micro-batches of 1 to 8 sequences: accumulation,
    or 1F1B's micro-batches) that fits in memory, fastest first."""
    found = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8, 16):
            dp = gpus // (tp * pp)
            if dp < 1 or dp * tp * pp != gpus or global_batch % dp:
                continue
            for micro in (1, 2, 4, 8):
                if (global_batch // dp) % micro:
                    continue
                for zero in (0, 1, 3):
                    for recompute in (False, True):
                        plan = Plan(dp, tp, pp, zero, global_batch // dp // micro, recompute)
                        prediction = predict(model, plan, global_batch, device, inter)
                        if prediction.fits:
                            found.append((plan, prediction))
    return sorted(found, key=lambda found_plan: found_plan[1].seconds)


def measured_link(alpha: float, beta: float, name: str = "this machine") -> Link:
    """A link from a fitted alpha (s per message) and beta (s per byte)."""
    return Link(name, alpha, 1 / beta)


# -- calibrating on this machine: a rank function for dl.launch -------------------------------------------------

def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _layer_inputs(model, x) -> list:
    """The input each layer gets in the model's forward."""
    import torch

    inputs, out = [], x
    with torch.no_grad():
        for layer in model:
            inputs.append(out)
            out = layer(out)
    return inputs


def _one_pass_of_layers(model, inputs) -> list[float]:
    """Forward+backward of each layer alone, on the input it gets in the model."""
    import time

    import torch

    times = []
    for layer, given in zip(model, inputs):
        start = time.perf_counter()
        given = given.detach().requires_grad_(given.is_floating_point())
        y = layer(given)
        y.backward(torch.ones_like(y))
        times.append(time.perf_counter() - start)
    return times


def _one_step(ctx, model, optimizer, data, reduce: bool) -> float:
    """Seconds of a whole data-parallel step (draw the batch, forward, backward, flatten the gradients, Adam),
    with its all-reduce or without."""
    import time

    import torch
    import torch.distributed as dist

    from ..gpt import lm_loss

    dist.barrier()
    start = time.perf_counter()
    x, y = next(data)
    lm_loss(model(x), y).backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    if reduce:
        dist.all_reduce(grads)
        grads.div_(ctx.world_size)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    return time.perf_counter() - start


def _timed_in_turns(ctx, model, data, repeats: int) -> tuple[list[float], float, float]:
    """Medians of each layer alone, of the step without its all-reduce and of the step with it, timed in turns
    within each round, so that a burst of load from other processes hits the three alike; the first round warms
    up and is dropped."""
    import torch

    inputs = _layer_inputs(model, next(data)[0])
    optimizer = torch.optim.Adam(model.parameters())
    rounds = [(_one_pass_of_layers(model, inputs), _one_step(ctx, model, optimizer, data, reduce=False),
               _one_step(ctx, model, optimizer, data, reduce=True)) for _ in range(repeats + 1)][1:]
    passes, locals_, steps = zip(*rounds)
    return [_median(runs) for runs in zip(*passes)], _median(locals_), _median(steps)


def calibrate(ctx, batch: int = 8, cfg: GPTConfig | None = None, repeats: int = 15) -> dict:
    """On every rank at once: all-reduce times at four sizes (alpha and beta); then, in turns, each layer's
    forward+backward, the step without its all-reduce and the plain data-parallel step. The simulator predicts
    the last from the layers, the rest of the local step (data, loss, flattening, Adam) and the link."""
    import torch
    import torch.distributed as dist

    from ..communication.collectives import time_all_reduces
    from ..communication.cost import critical_bytes, fit_alpha_beta, message_rounds
    from ..gpt import gpt
    from .zero import _data

    cfg = cfg or GPTConfig()
    model = gpt(cfg).to(ctx.device)
    data = _data(ctx, cfg, batch, seed=0)
    rows = time_all_reduces(ctx, [1 << 12, 1 << 16, 1 << 19, 1 << 21], algorithms=("gloo",), repeats=repeats)
    n = ctx.world_size
    alpha, beta = fit_alpha_beta([message_rounds("ring", n)] * len(rows),
                                 [critical_bytes("ring", r["bytes"] // 4, 4, n) for r in rows],
                                 [r["seconds"] for r in rows])
    layers, local, step = _timed_in_turns(ctx, model, data, repeats)
    slowest = torch.tensor([*layers, local - sum(layers), step], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a data-parallel step waits for its slowest rank
    *layers, other, step = slowest.tolist()
    return {"layer_seconds": layers, "other_seconds": other, "alpha": alpha, "beta": beta,
            "grad_bytes": 4 * sum(p.numel() for p in model.parameters()), "step_seconds": step}
