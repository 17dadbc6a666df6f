"""Export a notebook's lab for nbgrader, the Jupyter project's grading tool.

    python -m distlab.labs.export notebooks/02_communication.ipynb course/source/lab02/ [--lab-only]

writes an nbgrader *source* notebook: each stub gets the reference solution between nbgrader's
`### BEGIN SOLUTION` / `### END SOLUTION` markers (its solution cell), and each `labs.check(...)` cell
becomes a locked autograder cell, `labs.check(...).require()` (it raises with the diagnosis), worth one
point. Then the usual
nbgrader steps apply: `nbgrader generate_assignment` strips the solutions for the students, and
`nbgrader autograde` runs the real checks on what they hand in. `--lab-only` keeps the imports and the
Lab section alone (a short assignment that autogrades in seconds).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import textwrap
from pathlib import Path

CHECK = re.compile(r'labs\.check\("(?P<exercise>[\w.]+)",\s*(?P<function>\w+)')
SCHEMA = 3


def reference_body(exercise: str) -> str:
    """The body of the exercise's reference solution (solutions/ref<NN>.py), dedented."""
    notebook, _, name = exercise.partition(".")
    solution = getattr(importlib.import_module(f"{__package__}.solutions.ref{notebook}"), name)
    lines = inspect.getsource(solution).splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith(":")) + 1  # past the signature
    body = textwrap.dedent("\n".join(lines[start:]))
    return re.sub(r'^(?:"""|\'\'\').*?(?:"""|\'\'\')\n', "", body, count=1, flags=re.S)  # its docstring


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _set_source(cell: dict, text: str) -> None:
    cell["source"] = text.splitlines(keepends=True)


def _mark(cell: dict, grade_id: str, *, solution: bool, grade: bool, points: int = 0) -> None:
    marks = {"grade": grade, "grade_id": grade_id, "locked": not solution, "schema_version": SCHEMA,
             "solution": solution, "task": False}
    if grade:
        marks["points"] = points
    cell["metadata"]["nbgrader"] = marks


def _with_solution(stub: str, function: str, exercise: str) -> str:
    """The stub's signature line, then the reference body between nbgrader's solution markers."""
    signature = next(line for line in stub.splitlines() if line.startswith(f"def {function}("))
    body = textwrap.indent(f"### BEGIN SOLUTION\n{reference_body(exercise).rstrip()}\n### END SOLUTION", "    ")
    return f"{signature}\n{body}\n"


def export(notebook: Path, destination: Path, lab_only: bool = False) -> Path:
    """Write the nbgrader source version of `notebook` into the folder `destination`; return its path."""
    nb = json.loads(notebook.read_text())
    cells = nb["cells"]
    lab = next((i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
                and _source(c).startswith("## Lab")), None)
    if lab is None:
        raise ValueError(f"{notebook} has no '## Lab' section")
    stubs = {}
    for cell in cells[lab:]:
        found = re.search(r"^def (\w+)\(", _source(cell), flags=re.M)
        if cell["cell_type"] == "code" and found and "NotImplementedError" in _source(cell):
            stubs[found.group(1)] = cell
    for cell in cells[lab:]:
        match = CHECK.search(_source(cell)) if cell["cell_type"] == "code" else None
        if match is None:
            continue
        exercise, function = match["exercise"], match["function"]
        if function not in stubs:
            raise ValueError(f"{notebook}: the check of {exercise} calls {function}, which no stub cell defines")
        _set_source(stubs[function], _with_solution(_source(stubs[function]), function, exercise))
        grade_id = exercise.replace(".", "-")  # nbgrader ids: letters, digits, - and _
        _mark(stubs[function], f"{grade_id}-solution", solution=True, grade=False)
        _set_source(cell, f'labs.check("{exercise}", {function}).require()\n')
        _mark(cell, f"{grade_id}-check", solution=False, grade=True, points=1)
    if lab_only:
        first_code = next(i for i, c in enumerate(cells) if c["cell_type"] == "code")
        nb["cells"] = [cells[first_code], *cells[lab:]]
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    destination.mkdir(parents=True, exist_ok=True)
    path = destination / notebook.name
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distlab.labs.export", description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("destination", type=Path, help="the assignment's folder under nbgrader's source/")
    parser.add_argument("--lab-only", action="store_true", help="keep the imports and the Lab section only")
    args = parser.parse_args(argv)
    print(export(args.notebook, args.destination, args.lab_only))


if __name__ == "__main__":
    main()
