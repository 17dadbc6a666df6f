"""A student changes the number of ranks first: every notebook runs at other world sizes, or refuses before
launching with the sizes that work."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import nbformat
import pytest

import distlab as dl
from notebook_browser import run_headless

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9]*.ipynb"))
# A notebook whose metadata says "launches": false runs in one process (05b's vectorized federated
# simulation); test_notebooks_that_say_they_launch_nothing_launch_nothing holds it to that.
IN_PROCESS = [nb for nb in NOTEBOOKS
              if nbformat.read(nb, as_version=4).metadata.get("distlab", {}).get("launches") is False]
TIMEOUT = float(os.environ.get("DISTLAB_NOTEBOOK_TIMEOUT", "600"))


@dl.world_sizes(lambda n, dp=2: n % dp == 0 and n > dp, "a dp × tp mesh needs a multiple of dp ranks, and tp ≥ 2")
def meshed(ctx, dp=2):
    return ctx.world_size


def test_a_refused_size_starts_no_process_and_names_the_sizes_that_work(tmp_path: Path) -> None:
    with pytest.raises(dl.WorldSizeError, match=r"meshed cannot run on 3 rank\(s\): a dp × tp mesh .* runs on: "
                                                 r"4, 6, 8, 10, 12, 14, 16\."):
        dl.launch(meshed, world_size=3, runs_root=str(tmp_path))
    assert not any(tmp_path.iterdir()), "a refused launch must not create a run folder"


def test_the_rule_sees_the_functions_arguments_also_through_partial(tmp_path: Path) -> None:
    with pytest.raises(dl.WorldSizeError, match="runs on: 6, 9, 12, 15"):
        dl.launch(functools.partial(meshed, dp=3), world_size=4, runs_root=str(tmp_path))
    assert dl.launch(meshed, world_size=4, dp=2, runs_root=str(tmp_path), quiet=True).results == [4] * 4


def test_notebooks_that_say_they_launch_nothing_launch_nothing() -> None:
    for notebook in IN_PROCESS:
        code = "\n".join(c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code")
        assert "launch(" not in code and "on_ranks(" not in code, f"{notebook.name} launches ranks"


@pytest.mark.timeout(TIMEOUT + 120)
@pytest.mark.parametrize("notebook", [nb for nb in NOTEBOOKS if nb not in IN_PROCESS], ids=lambda p: p.stem)
def test_notebook_runs_with_other_world_sizes(notebook: Path, tmp_path: Path) -> None:
    """Every launch asks for another size (4 → 3, 3 → 2, 2 → 3); the notebook must still run clean, and
    whatever refuses must have said so before starting a process (the launch then runs at the notebook's size)."""
    log = tmp_path / "varied.jsonl"
    report = run_headless(notebook, TIMEOUT, vary_world_size=log)
    assert not report.failures(), report.describe()
    launches = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    varied = [e for e in launches if e["refused"] is None]
    assert varied, f"no launch of {notebook.name} ran at another world size: {launches}"
    for e in launches:
        assert e["refused"] is None or "runs on:" in e["refused"], e
    print(f"{notebook.stem}: {len(varied)} of {len(launches)} launches at another size; refused: "
          f"{[e['refused'] for e in launches if e['refused']]}; slowest cells {report.slowest_cells}")
