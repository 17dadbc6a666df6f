"""benchmarks/gpu_check.py on the CPU (--device cpu --quick), as CI runs it so it cannot rot: every
notebook's check is in the table and passes, and every figure is there with a plausible value."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
CHECKS = {"collectives: naive, ring, recursive doubling, broadcast, all-gather", "gossip: D-PSGD and all-reduce train",
          "DDP: bucketed all-reduce = DistributedDataParallel", "pipeline GPipe = one process",
          "pipeline 1F1B = one process", "tensor parallel: by hand = parallelize_module",
          "inference: tensor-parallel block", "optimizers: SGD, Adam data-parallel", "parameter server (sync) = DDP",
          "federated: FedAvg on ranks = simulated"}
FIGURES = {"all-reduce bus bandwidth, built-in, 2 ranks, 1 MB": "GB/s", "all-reduce bus bandwidth, ring, 2 ranks, 1 MB":
           "GB/s", "tiny GPT, one process": "tokens/s", "tiny GPT, DDP (2 ranks, tokens of all)": "tokens/s",
           "tiny GPT, GPipe (2 stages)": "tokens/s", "tiny GPT, 1F1B (2 stages)": "tokens/s",
           "tiny GPT, tensor parallel (2 ranks)": "tokens/s", "dl.launch cold start, 2 ranks": "s",
           "dl.launch warm start, 2 ranks": "s", "DDP step without telemetry, 2 ranks": "ms",
           "telemetry overhead (ctx.watch + ctx.log every step), 2 ranks": "%"}


def test_the_gpu_check_runs_on_the_cpu_and_every_check_passes(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=400, env=env)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["check"]: c for c in report["checks"]}
    zero = {"ZeRO 1-3 (and FSDP2) = data parallelism"} if report["zero"] == "present" else set()
    assert set(checks) == CHECKS | zero, done.stderr[-2000:]
    failed = {name: c["detail"] for name, c in checks.items() if not c["ok"]}
    assert not failed and done.returncode == 0, failed
    assert report["device"] == "cpu" and report["machine"]["audit"] == os.environ["DISTLAB_AUDIT"]  # as the suite runs
    figures = {f["figure"]: f for f in report["figures"]}
    assert {name: f["unit"] for name, f in figures.items()} == FIGURES
    for name, f in figures.items():
        if f["unit"] != "%":
            assert f["value"] > 0 and f["placement"] == "CPU, gloo", (name, f)
    assert figures["dl.launch warm start, 2 ranks"]["value"] < figures["dl.launch cold start, 2 ranks"]["value"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(name in table for name in CHECKS | set(FIGURES)) and "**NO**" not in table
