"""The one prepared GPU check: every notebook's distributed functions on this machine's devices, checked,
and the figures that matter on GPUs, in one table.

    python benchmarks/gpu_check.py                      # backend="auto": NCCL with a GPU per rank, else gloo
    python benchmarks/gpu_check.py --device cpu --quick  # CI: the same code on the CPU, in about a minute
    make gpu-check

Checks: a short configuration of each notebook's rank functions (hand-written collectives, DDP, parameter
server, gossip, federated, GPipe / 1F1B, tensor parallel, inference, the optimizers, ZeRO / FSDP where
distlab.parallel.zero exists), each against its built-in or single-process counterpart; on GPUs also
against the same function run on the CPU (ranks.gpu_count pinned to 0). Figures: all-reduce bus bandwidth,
built-in (NCCL on GPUs) beside the hand-written ring, at 2 and 4 ranks; tiny-GPT tokens/s for one process,
DDP, GPipe, 1F1B and tensor parallel; dl.launch cold and warm; telemetry's cost per DDP step.
Writes gpu_check.md and gpu_check.json into --out (default: $OUT, else runs/gpu_check); exit status 1
when a check failed. Figures are one short run each: a smoke reading, not a benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distlab as dl
from distlab import data, gpt, models, ranks
from distlab.architectures import gossip
from distlab.architectures import parameter_server as ps
from distlab.architectures.federated import partition
from distlab.architectures.federated.processes import train_federated
from distlab.architectures.federated.simulation import Config as FedConfig
from distlab.architectures.federated.simulation import simulate
from distlab.communication import collectives
from distlab.optim.distributed import train_optimizer
from distlab.parallel import data_parallel, inference, pipeline, tensor

TOLERANCE = 1e-4  # float32 round-off between two ways (or two devices) of computing the same thing


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def on_cpu():
    """Launches inside place every rank on the CPU, GPUs or not: the reference run."""
    count = ranks.gpu_count
    ranks.gpu_count = lambda: 0
    try:
        yield
    finally:
        ranks.gpu_count = count


def launch(fn, world_size: int, **kwargs) -> dl.Run:
    return dl.launch(fn, world_size=world_size, timeout=240, quiet=True, **kwargs)


def gap(a, b) -> float:
    """The largest coordinate-wise difference of two nested results (tensors, numbers, lists, dicts)."""
    if isinstance(a, dict):
        return max((gap(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        return max((gap(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if a is None or isinstance(a, str):
        return 0.0 if a == b else math.inf
    return models.largest_difference(torch.as_tensor(a, dtype=torch.float64).cpu(),
                                     torch.as_tensor(b, dtype=torch.float64).cpu())


# -- rank functions of the script's own ---------------------------------------------------------------

def collectives_agree(ctx) -> dict:
    """Each hand-written all-reduce, broadcast and all-gather beside torch.distributed's, on ctx.device."""
    x = torch.arange(1000, dtype=torch.float32) * (ctx.rank + 1) / 1000
    builtin = x.clone()
    dist.all_reduce(builtin)
    gaps = {a: gap(collectives.all_reduce(x.clone(), algorithm=a), builtin) for a in collectives.ALL_REDUCES}
    sent = torch.full((5,), float(ctx.rank))
    gaps["broadcast"] = gap(collectives.broadcast(sent.clone(), src=1), torch.ones(5))
    gathered = collectives.all_gather([torch.empty(5) for _ in range(ctx.world_size)], sent)
    gaps["all_gather"] = gap(torch.stack(gathered), torch.arange(ctx.world_size).repeat_interleave(5).view(-1, 5))
    return {"gaps": gaps, "sum": builtin.sum().item(), "device": str(builtin.device)}


def ddp_gpt(ctx, steps: int, batch_size: int, cfg: gpt.GPTConfig) -> None:
    """The tiny GPT under DistributedDataParallel, each rank on its own batches; logs every step."""
    model = nn.parallel.DistributedDataParallel(gpt.gpt(cfg))
    _train_logged(ctx, model, gpt.batches(batch_size, cfg.block_size, seed=ctx.rank), steps)


def single_gpt(ctx, steps: int, batch_size: int, cfg: gpt.GPTConfig) -> None:
    _train_logged(ctx, gpt.gpt(cfg), gpt.batches(batch_size, cfg.block_size), steps)


def _train_logged(ctx, model, batches, steps: int) -> None:
    """SGD steps on the language-model loss, each logged once the device is done (tokens/s from the rows)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, y = next(batches)
        optimizer.zero_grad()
        gpt.lm_loss(model(x), y).backward()
        optimizer.step()
        synchronize(ctx)
        ctx.log(step=step)


def synchronize(ctx) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def bus_bandwidth(ctx, nbytes: int, repeats: int) -> dict:
    """GB/s of bus bandwidth, 2(N-1)/N·S / t (NCCL's busBW), of dist.all_reduce and of the hand-written ring:
    the slowest rank's median of `repeats` calls after one warm-up."""
    tensor = torch.ones(nbytes // 4)
    out = {}
    for name, call in (("built-in", dist.all_reduce), ("ring", collectives.ring_all_reduce)):
        times = []
        for _ in range(repeats + 1):
            dist.barrier()
            synchronize(ctx)
            start = time.perf_counter()
            call(tensor)
            synchronize(ctx)
            times.append(time.perf_counter() - start)
        seconds = torch.tensor([statistics.median(times[1:])], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        out[name] = 2 * (ctx.world_size - 1) / ctx.world_size * nbytes / seconds.item() / 1e9
    return out


def step_seconds(ctx, steps: int, telemetry: bool) -> list[float]:
    """The notebooks' small DDP step (digits MLP, batch 32), with ctx.watch + ctx.log every step or without."""
    torch.manual_seed(0)
    x, y, _, _ = data.digits(ctx.rank, ctx.world_size)
    model = nn.parallel.DistributedDataParallel(models.mlp(64, 64, 10))
    if telemetry:
        ctx.watch(model, drift_every=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches, times = data.minibatches(x, y, 32, rank=ctx.rank), []
    for step in range(steps):
        start = time.perf_counter()
        xb, yb = next(batches)
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if telemetry:
            ctx.log(step=step, loss=loss.item())
        synchronize(ctx)
        times.append(time.perf_counter() - start)
    return times


def nothing(ctx) -> int:
    return ctx.rank


# -- the checks --------------------------------------------------------------------------------------

def headline(error: Exception) -> str:
    """The last line of an error (a rank's traceback ends with its exception), for one table cell."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [""]
    return lines[-1][:400]


@dataclass
class Check:
    """One notebook's functions: run them, say whether they agree with their counterpart, and what to set
    beside the CPU's run (`signature`)."""

    name: str
    world_size: int
    run: object  # () -> (ok: bool, detail: str, signature)
    outcome: dict = field(default_factory=dict)


def check_collectives(ws):
    out = launch(collectives_agree, ws).results
    worst = max(gap for r in out for gap in r["gaps"].values())
    expected = ws * (ws + 1) / 2 * 499.5
    ok = worst <= TOLERANCE and all(abs(r["sum"] - expected) <= 1e-2 for r in out)
    return ok, f"largest gap {worst:.1e}, sum {out[0]['sum']:.1f} (expected {expected:.1f}) on {out[0]['device']}", \
        [r["sum"] for r in out]


def check_ddp(ws):
    hand = launch(data_parallel.train_data_parallel, ws, averaging="bucket", steps=5).results
    builtin = launch(data_parallel.train_data_parallel, ws, averaging="ddp", steps=5).results
    worst = max(gap(a["params"], b["params"]) for a, b in zip(hand, builtin))
    return worst <= TOLERANCE, f"bucketed all-reduce vs DistributedDataParallel: {worst:.1e}", builtin[0]["params"]


def data_parallel_sgd(workers: int, steps: int, lr: float = 0.2, batch: int = 32) -> torch.Tensor:
    """What a synchronous parameter server (and DDP) computes, in this process: SGD on the workers' mean
    gradient, each worker drawing its own minibatches (ps.Worker's shards and streams)."""
    model = ps.build_model()
    streams = [data.minibatches(*data.digits(w, workers)[:2], batch, 0, w) for w in range(workers)]
    flat = ps.flat_parameters(model)
    for _ in range(steps):
        grads = [models.gradient(model, *next(stream))[0] for stream in streams]
        flat -= lr * torch.stack(grads).mean(0)
        nn.utils.vector_to_parameters(flat, model.parameters())
    return flat


def check_parameter_server(ws):
    served = ps.final_parameters(launch(ps.train, ws, mode="sync", steps=8).results)
    worst = gap(served, data_parallel_sgd(ws - 1, steps=8))
    return worst <= TOLERANCE, f"sync parameter server vs SGD on its {ws - 1} workers' mean gradient: {worst:.1e}", \
        served


def check_gossip(ws):
    runs = {a: launch(gossip.train, ws, algorithm=a, steps=30, eval_every=30).results for a in ("allreduce", "dpsgd")}
    accuracy = {a: statistics.fmean(r["accuracy"] for r in out) for a, out in runs.items()}
    ok = all(0.3 <= v <= 1 for v in accuracy.values())
    return ok, "mean accuracy after 30 steps: " + ", ".join(f"{a} {v:.3f}" for a, v in accuracy.items()), \
        [r["accuracy"] for out in runs.values() for r in out]


def check_federated(ws):
    fed, config = partition.digits(num_clients=4), FedConfig(rounds=2)
    on_ranks = launch(train_federated, ws, fed=fed, config=config).results[0]
    worst = gap(on_ranks, simulate(fed, config, "loop").params)
    return worst <= TOLERANCE, f"FedAvg on ranks vs simulated in one process: {worst:.1e}", on_ranks


def check_pipeline(ws, schedule):
    out = launch(pipeline.pipeline_train, ws, schedule=schedule, micro_batches=4, steps=1).results
    losses, grads = gpt.train_single(steps=1)
    got = {name: g for r in out for name, g in r["grads"].items()}
    worst = max(gap(got[name], grads[name]) for name in got)
    loss_gap = abs(out[-1]["losses"][0] - losses[0])
    ok = worst <= TOLERANCE and loss_gap <= TOLERANCE and set(got) == set(grads)
    return ok, f"{schedule} gradients vs the whole model in one process: {worst:.1e} (loss {loss_gap:.1e})", \
        out[-1]["losses"]


def check_tensor_parallel(ws):
    mine = launch(tensor.sharded_block_step, ws).results
    builtin = launch(tensor.builtin_block_step, ws).results
    worst = gap(mine[0]["out"], builtin[0]["out"])
    return worst <= TOLERANCE, f"Megatron block by hand vs parallelize_module: {worst:.1e}", mine[0]["out"]


def check_inference(ws):
    out = launch(inference.tp_block_inference, ws).results
    worst = max(gap(r["out"], out[0]["out"]) for r in out)
    ok = worst <= TOLERANCE and bool(torch.isfinite(torch.as_tensor(out[0]["out"])).all())
    return ok, f"sharded block forward, ranks agree within {worst:.1e}", out[0]["out"]


def check_optimizers(ws):
    rates = {"sgd": 0.1, "adam": 0.01}
    accuracy = {o: launch(train_optimizer, ws, optimizer=o, steps=20, lr=lr).results for o, lr in rates.items()}
    agree = max(max(a) - min(a) for a in accuracy.values())
    ok = agree <= 1e-6 and all(0 < a[0] <= 1 for a in accuracy.values())
    return ok, "replicas agree; accuracy " + ", ".join(f"{o} {a[0]:.3f}" for o, a in accuracy.items()), \
        [a[0] for a in accuracy.values()]


def check_zero(ws):
    zero = importlib.import_module("distlab.parallel.zero")
    plain = launch(zero.train_plain, ws).results[0]["losses"]
    sharded = {f"stage {s}": launch(zero.train_zero, ws, stage=s).results[0]["losses"] for s in (1, 2, 3)}
    if hasattr(zero, "train_fsdp2"):
        sharded["FSDP2"] = launch(zero.train_fsdp2, ws).results[0]["losses"]
    worst = max(gap(losses, plain) for losses in sharded.values())
    return worst <= 1e-3, f"{', '.join(sharded)} losses vs plain data parallelism: {worst:.1e}", plain


def zero_present() -> bool:
    return importlib.util.find_spec("distlab.parallel.zero") is not None


def checks(quick: bool) -> list[Check]:
    four = 2 if quick else 4  # ranks for the collectives that show N
    found = [Check("collectives: naive, ring, recursive doubling, broadcast, all-gather", four,
                   lambda: check_collectives(four)),
             Check("gossip: D-PSGD and all-reduce train", four, lambda: check_gossip(four)),
             Check("DDP: bucketed all-reduce = DistributedDataParallel", 2, lambda: check_ddp(2)),
             Check("pipeline GPipe = one process", 2, lambda: check_pipeline(2, "gpipe")),
             Check("pipeline 1F1B = one process", 2, lambda: check_pipeline(2, "1f1b")),
             Check("tensor parallel: by hand = parallelize_module", 2, lambda: check_tensor_parallel(2)),
             Check("inference: tensor-parallel block", 2, lambda: check_inference(2)),
             Check("optimizers: SGD, Adam data-parallel", 2, lambda: check_optimizers(2)),
             Check("parameter server (sync) = DDP", 3, lambda: check_parameter_server(3)),
             Check("federated: FedAvg on ranks = simulated", 3, lambda: check_federated(3))]
    if zero_present():
        found.append(Check("ZeRO 1-3 (and FSDP2) = data parallelism", 2, lambda: check_zero(2)))
    else:
        progress("ZeRO / FSDP: not present (no distlab.parallel.zero)")
    return sorted(found, key=lambda c: (c.world_size != 2, c.world_size))  # warm ranks: fewest pools started


def run_checks(selected: list[Check], device: str) -> None:
    for check in selected:
        progress(f"check: {check.name}")
        start = time.perf_counter()
        try:
            ok, detail, signature = check.run()
        except Exception as error:  # a failed check is a row of the table, not the end of the script
            ok, detail, signature = False, f"{type(error).__name__}: {headline(error)}", None
        check.outcome = {"check": check.name, "ranks": check.world_size, "ok": bool(ok), "detail": detail,
                         "seconds": round(time.perf_counter() - start, 2), "signature": signature}
    if device != "cpu":
        with on_cpu():
            for check in selected:
                progress(f"CPU reference: {check.name}")
                try:
                    reference = check.run()[2]
                    versus = gap(check.outcome["signature"], reference)
                except Exception as error:
                    reference, versus = None, math.inf
                    check.outcome["detail"] += f"; the CPU run failed: {type(error).__name__}"
                check.outcome["vs CPU"] = versus
                check.outcome["ok"] = check.outcome["ok"] and versus <= 1e-3
                check.outcome["detail"] += f"; vs the CPU's run {versus:.1e}"


# -- the figures -------------------------------------------------------------------------------------

def tokens_per_second(run: dl.Run, warmup: int, tokens_per_step: int) -> float:
    rows = run.metrics.dropna(subset=["step"])
    rows = rows[rows["rank"] == rows["rank"].max()]
    timed = rows[rows["step"] >= warmup - 1]
    return (len(timed) - 1) * tokens_per_step / (timed["t"].iloc[-1] - timed["t"].iloc[0])


def figures(quick: bool) -> list[dict]:
    rows = []

    def add(name, value, unit, run=None, note=""):
        placement = run.config.get("placement", "") if run is not None else ""
        rows.append({"figure": name, "value": round(value, 4), "unit": unit, "placement": placement, "note": note})

    nbytes, repeats = (1 << 20, 3) if quick else (64 << 20, 10)

    def bandwidth(ws):
        progress(f"figure: all-reduce bus bandwidth, {ws} ranks, {nbytes >> 20} MB")
        run = launch(bus_bandwidth, ws, nbytes=nbytes, repeats=repeats)
        for name, value in run.results[0].items():
            add(f"all-reduce bus bandwidth, {name}, {ws} ranks, {nbytes >> 20} MB", value, "GB/s", run,
                "NCCL" if run.config["backend"] == "nccl" and name == "built-in" else run.config["backend"])

    bandwidth(2)
    cfg = gpt.GPTConfig() if quick else gpt.GPTConfig(d_model=256, n_layer=8, block_size=64)
    steps, warmup, batch = (4, 1, 8) if quick else (30, 5, 64)
    tokens = batch * cfg.block_size
    setups = {"tiny GPT, DDP (2 ranks, tokens of all)": (ddp_gpt, 2, dict(steps=steps, batch_size=batch, cfg=cfg)),
              "tiny GPT, GPipe (2 stages)": (pipeline.pipeline_train, 2, dict(
                  schedule="gpipe", micro_batches=4, batch_size=batch, steps=steps, lr=0.1, cfg=cfg)),
              "tiny GPT, 1F1B (2 stages)": (pipeline.pipeline_train, 2, dict(
                  schedule="1f1b", micro_batches=4, batch_size=batch, steps=steps, lr=0.1, cfg=cfg)),
              "tiny GPT, tensor parallel (2 ranks)": (tensor.data_tensor, 2, dict(
                  dp=1, tp=2, batch_size=batch, steps=steps, lr=0.1, cfg=cfg)),
              "tiny GPT, one process": (single_gpt, 1, dict(steps=steps, batch_size=batch, cfg=cfg))}
    telemetry_costs(add, quick)
    progress("figure: dl.launch cold and warm")
    start = time.perf_counter()
    run = launch(nothing, 2, fresh=True)
    add("dl.launch cold start, 2 ranks", time.perf_counter() - start, "s", run)
    start = time.perf_counter()
    run = launch(nothing, 2)
    add("dl.launch warm start, 2 ranks", time.perf_counter() - start, "s", run)
    for name, (fn, ws, kwargs) in setups.items():
        progress(f"figure: {name}")
        run = launch(fn, ws, **kwargs)
        add(name, tokens_per_second(run, warmup, tokens * (2 if fn is ddp_gpt else 1)), "tokens/s", run)
    if not quick:
        bandwidth(4)
    return rows


def telemetry_costs(add, quick: bool) -> None:
    """Step time of the small DDP training with and without ctx.watch + ctx.log, ABBA so drift cancels."""
    progress("figure: telemetry overhead")
    step_ms = {False: [], True: []}
    for telemetry in (False, True, True, False):
        run = launch(step_seconds, 2, steps=60 if quick else 300, telemetry=telemetry)
        step_ms[telemetry] += [t * 1000 for rank in run.results for t in rank[10:]]
    base, watched = (statistics.median(step_ms[k]) for k in (False, True))
    add("DDP step without telemetry, 2 ranks", base, "ms", run)
    add("telemetry overhead (ctx.watch + ctx.log every step), 2 ranks", (watched / base - 1) * 100, "%", run)


# -- the report --------------------------------------------------------------------------------------

def machine() -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(ranks.gpu_count())]
    return {"host": platform.node(), "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "gpus": gpus, "audit": os.environ.get("DISTLAB_AUDIT", "")}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# distlab GPU check ({report['device']}{', quick' if report['quick'] else ''})", "",
             f"{m['cpus']} CPU cores, torch {m['torch']}, GPUs: {', '.join(m['gpus']) or 'none'}; "
             f"{report['seconds']:.0f} s", "", "| check | ranks | ok | detail |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['ranks']} | {'yes' if c['ok'] else '**NO**'} | {c['detail']} |"
              for c in report["checks"]]
    lines += ["", "| figure | value | unit | placement | note |", "|---|---|---|---|---|"]
    lines += [f"| {f['figure']} | {f['value']:.4g} | {f['unit']} | {f['placement']} | {f['note']} |"
              for f in report["figures"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: the GPUs there are (CPU when none); cpu: every rank on the CPU")
    parser.add_argument("--quick", action="store_true", help="the smallest configurations (CI)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    args = parser.parse_args(argv)
    device = "cpu" if args.device == "cpu" or ranks.gpu_count() == 0 else "cuda"
    start = time.perf_counter()
    with on_cpu() if device == "cpu" else contextlib.nullcontext():
        selected = checks(args.quick)
        run_checks(selected, device)
        found = figures(args.quick)
    dl.shutdown()
    outcomes = [{k: v for k, v in c.outcome.items() if k != "signature"} for c in selected]
    report = {"device": device, "quick": args.quick, "machine": machine(), "checks": outcomes, "figures": found,
              "zero": "present" if zero_present() else "not present", "seconds": time.perf_counter() - start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(c["ok"] for c in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
