"""The course map, the paths and the instructor guide say what the notebooks and distlab really do."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distlab as dl
from distlab import course

REPO = Path(__file__).resolve().parents[1]
GUIDE = (REPO / "docs" / "instructor.md").read_text()


def test_every_notebook_states_its_objectives_prerequisites_and_what_next() -> None:
    lessons = course.lessons()
    assert [lesson.file for lesson in lessons] == sorted(p.name for p in (REPO / "notebooks").glob("[0-9]*.ipynb"))
    for lesson in lessons:
        assert 2 <= len(lesson.objectives) <= 6, f"{lesson.file}: {lesson.objectives}"
        assert lesson.next, f"{lesson.file} links to no next notebook"
    assert not course.problems(lessons)


def test_the_map_finds_broken_links_and_prerequisites_out_of_order(tmp_path: Path) -> None:
    def notebook(name: str, before: str, after: str) -> None:
        cells = [{"cell_type": "markdown", "source": f"# {name[:2]} · T\n\n**You will**\n- a\n- b\n\n"
                                                     f"**Before this:** {before}"},
                 {"cell_type": "markdown", "source": f"## What next\n\n- {after}"}]
        (tmp_path / f"{name}.ipynb").write_text(json.dumps({"cells": cells}))

    notebook("00_a", "nothing", "[01](01_b.ipynb)")
    notebook("01_b", "[02](02_c.ipynb)", "[09](09_gone.ipynb)")
    notebook("02_c", "[00](00_a.ipynb)", "[00](00_a.ipynb)")
    found = course.problems(course.lessons(tmp_path))
    assert "01_b.ipynb links to 09_gone.ipynb, which does not exist" in found
    assert "01_b.ipynb needs 02_c.ipynb first, which comes at or after it in the course" in found
    assert not [f for f in found if f.startswith(("00_a", "02_c"))]


def test_a_notebook_without_its_opening_is_named_with_what_it_lacks(tmp_path: Path) -> None:
    bad = tmp_path / "03_x.ipynb"
    bad.write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": "# 03 · X"}]}))
    with pytest.raises(ValueError, match=r"03_x.ipynb lacks a '\*\*You will\*\*' list, a '\*\*Before this:\*\*' "
                                         r"line, a '## What next' cell"):
        course.read_lesson(bad)


def test_timings_come_from_executed_notebooks_and_the_guide_shows_them(tmp_path: Path) -> None:
    """`record` reads the per-cell times JupyterLab saved and the browser test's samples."""
    cell = {"cell_type": "code", "source": "dl.launch(train, world_size=4)", "outputs": [],
            "metadata": {"execution": {"iopub.execute_input": "2026-12-02T01:00:00.000Z",
                                       "shell.execute_reply": "2026-12-02T01:00:12.500Z"}}}
    quick = dict(cell, source="x = 1", metadata={"execution": {"iopub.execute_input": "2026-12-02T01:00:13.000Z",
                                                               "shell.execute_reply": "2026-12-02T01:00:13.250Z"}})
    (tmp_path / "04_x.ipynb").write_text(json.dumps({"cells": [cell, quick]}))
    (tmp_path / "04_x.json").write_text(json.dumps({"seconds": 31.0, "cpu_seconds": 20.5, "peak_rss_mb": 900.4}))
    measured = course.measure(tmp_path / "04_x.ipynb")
    assert measured["run_all_s"] == 12.8 and measured["cpu_s"] == 20.5 and measured["peak_rss_mb"] == 900
    assert measured["slowest"][0] == {"cell": 0, "seconds": 12.5, "starts": "dl.launch(train, world_size=4)"}
    timings = {"machine": "m", "measured": "d", "notebooks": {"04_x": measured}}
    table = course.timing_table(timings)
    assert "| [04_x](../notebooks/04_x.ipynb) | 13 s | 31 s | 20 s | 900 MB |" in table


def test_the_guide_shows_the_recorded_timings() -> None:
    timings = course.load_timings()
    assert course.timing_table(timings) in GUIDE, "run python -m distlab.course record build/executed '<machine>'"
    known = {p.stem for p in (REPO / "notebooks").glob("*.ipynb")}
    assert set(timings["notebooks"]) <= known, set(timings["notebooks"]) - known


def test_the_paths_fit_their_sessions() -> None:
    timings = course.load_timings()
    routes = course.paths(timings=timings).set_index("path")
    assert routes.loc["full course", "notebooks"].count("→") == len(course.lessons()) - 1
    for name, length in course.PATH_MINUTES.items():
        assert routes.loc[name, "Run All (min, measured)"] <= length / 3, routes.loc[name]


def hang(ctx):
    peer = torch.zeros(2)
    dist.recv(peer, src=1 - ctx.rank)  # both wait: the deadlock students write first


def fail_on_rank_one(ctx):
    if ctx.rank == 1:
        return torch.zeros(3)[5]


@dl.world_sizes(lambda n: n == 4, "a 2 × 2 mesh needs 4 ranks")
def mesh(ctx):
    return ctx.rank


def needs_steps(ctx, steps):
    return steps


@pytest.mark.timeout(120)
def test_the_guide_quotes_what_distlab_really_prints() -> None:
    """Each mistake in the guide's list, made for real: the guide's quoted fragments are in the message."""
    messages = {}
    for name, call, error in [
        ("rank failure", lambda: dl.launch(fail_on_rank_one, world_size=2, quiet=True), dl.RankFailure),
        ("deadlock", lambda: dl.launch(hang, world_size=2, timeout=5, quiet=True), dl.LaunchTimeout),
        ("world size", lambda: dl.launch(mesh, world_size=3), dl.WorldSizeError),
        ("too many ranks", lambda: dl.launch(needs_steps, world_size=200, steps=1), ValueError),
        ("arguments", lambda: dl.launch(needs_steps, world_size=2), TypeError),
    ]:
        with pytest.raises(error) as caught:
            call()
        messages[name] = str(caught.value)
    quoted = {"rank failure": ["rank 1 failed; the other ranks were stopped."],
              "deadlock": ["still running after timeout=5s; all ranks were stopped.", "Where each rank was waiting:"],
              "world size": ["cannot run on 3 rank(s)", "With these arguments it runs on:"],
              "too many ranks": ["would start 200 Python processes, each importing torch"],
              "arguments": ["cannot be called with ctx"]}
    for name, fragments in quoted.items():
        for fragment in fragments:
            assert f"`{fragment}`" in GUIDE, f"the guide no longer quotes {fragment!r}"
            assert fragment in messages[name], f"{name}: distlab now prints {messages[name]!r}"
    assert re.search(r"rank 0: .*called from hang \(test_course.py:\d+\)", messages["deadlock"])
