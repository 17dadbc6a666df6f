"""A student's lab results across the course, kept in one small local file, and a class's files gathered.

Every `labs.check` appends one JSON line to `$DISTLAB_PROGRESS` (default `~/.distlab/progress.jsonl`):
who, which exercise, passed or not, when, how long the check took. An instructor collects the students'
files (e.g. from each home folder on the JupyterHub server) and `gather(paths)` makes one table.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path

PROGRESS_ENV = "DISTLAB_PROGRESS"


def progress_file() -> Path:
    return Path(os.environ.get(PROGRESS_ENV) or Path.home() / ".distlab" / "progress.jsonl")


def record(verdict) -> None:
    """Append one check's outcome (owner-only file: it names the student)."""
    path = progress_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    row = {"student": getpass.getuser(), "exercise": verdict.exercise, "status": verdict.status,
           "passed": verdict.passed, "summary": verdict.summary, "seconds": round(verdict.seconds, 2),
           "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as f:
        f.write(json.dumps(row) + "\n")


def _rows(paths) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def progress(path: str | os.PathLike | None = None):
    """This student's exercises: the latest outcome of each, how many tries, when it first passed."""
    import pandas as pd

    from .grading import all_exercises

    exercises = all_exercises()  # every exercise of the course, attempted or not
    target = Path(path) if path else progress_file()
    rows = pd.DataFrame(_rows([target]) if target.exists() else [],
                        columns=["student", "exercise", "status", "passed", "summary", "seconds", "at"])
    table = pd.DataFrame({"exercise": list(exercises)})
    table["title"] = [exercises[e].title for e in table["exercise"]]
    tries = rows.groupby("exercise").size()
    latest = rows.groupby("exercise").last()
    first_pass = rows[rows["passed"].astype(bool)].groupby("exercise")["at"].first()
    table["tries"] = table["exercise"].map(tries).fillna(0).astype(int)
    table["status"] = table["exercise"].map(latest["status"]).fillna("not attempted")
    table["first passed"] = table["exercise"].map(first_pass).fillna("")
    return table.set_index("exercise")


def gather(paths) -> object:
    """A class's progress files -> one table: a row per student, a column per exercise, ✓ where passed."""
    import pandas as pd

    rows = pd.DataFrame(_rows(paths))
    if rows.empty:
        return pd.DataFrame()
    passed = rows.groupby(["student", "exercise"])["passed"].any().unstack(fill_value=False)
    table = passed.replace({True: "✓", False: "✗"})
    table["passed"] = passed.sum(axis=1)
    return table
