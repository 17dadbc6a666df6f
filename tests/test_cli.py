"""The same function from a terminal: python -m distlab run, and under torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import distlab as dl

TESTS = Path(__file__).parent


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}


def test_python_m_distlab_run_spawns_ranks_and_prints_results(tmp_path):
    out = subprocess.run([sys.executable, "-m", "distlab", "run", "rank_fns:add", "--world-size", "3",
                          "--x", "7", "--runs-root", str(tmp_path)],
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "rank 0 result: 7" in out.stdout and "rank 2 result: 9" in out.stdout


def test_under_torchrun_the_process_is_a_rank(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "distlab", "run", "rank_fns:train_digits", "--steps", "5",
                          "--runs-root", str(tmp_path)],
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (folder,) = tmp_path.iterdir()
    run = dl.load_run(folder)
    assert run.status == "ok" and run.config["launcher"] == "torchrun"
    steps = run.metrics.dropna(subset=["step"])
    assert len(run.results) == 2 and len(steps) == 10
    assert (steps["comm_bytes"] > 0).all()  # DDP under torchrun, counted by the same hook
