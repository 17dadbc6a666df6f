"""A lab exported for nbgrader works with nbgrader itself: the release has no solutions, and autograding
gives full marks to a correct submission and none to the untouched stubs."""

import json
import os
import subprocess
import sys
from pathlib import Path

from distlab.labs.export import export

REPO = Path(__file__).resolve().parents[1]


def nbgrader(course: Path, *args: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env, check=True,
                   capture_output=True, timeout=600)


def code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_nbgrader_releases_without_solutions_and_autogrades_the_real_checks(tmp_path):
    course = tmp_path / "course"
    source = export(REPO / "notebooks" / "02_communication.ipynb", course / "source" / "lab02", lab_only=True)
    (course / "nbgrader_config.py").write_text('c = get_config()\nc.CourseDirectory.course_id = "distlab"\n')
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # alembic
               DISTLAB_RUNS=str(tmp_path / "runs"), DISTLAB_PROGRESS=str(tmp_path / "progress.jsonl"))
    nbgrader(course, "generate_assignment", "lab02", "--force", env=env)

    release = course / "release" / "lab02" / source.name
    cells = code_cells(release)
    solutions = [c for c in cells if c["metadata"].get("nbgrader", {}).get("solution")]
    checks = [c for c in cells if c["metadata"].get("nbgrader", {}).get("grade")]
    assert len(solutions) == len(checks) == 3
    assert not any("BEGIN SOLUTION" in "".join(c["source"]) for c in cells)
    assert all("raise NotImplementedError()" in "".join(c["source"]) for c in solutions)
    assert all("".join(c["source"]).startswith("labs.check(") and ".require()" in "".join(c["source"]) for c in checks)

    for student, notebook in (("ada", source), ("bob", release)):  # ada hands in the solutions, bob nothing
        handed_in = course / "submitted" / student / "lab02"
        handed_in.mkdir(parents=True)
        (handed_in / source.name).write_text(notebook.read_text())
        nbgrader(course, "db", "student", "add", student, env=env)
    nbgrader(course, "autograde", "lab02", "--force", env=env)

    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        scores = {s: gradebook.find_submission("lab02", s).score for s in ("ada", "bob")}
        assert scores == {"ada": 3.0, "bob": 0.0}
