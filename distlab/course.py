"""The course around the notebooks: what each one teaches, what to read first, how long it runs.

Each notebook opens with `# NN · Title`, a `**You will**` list of objectives and a `**Before this:**` line
of links, and has a `## What next` cell of links before its Lab; this module reads those. How long a
notebook runs is never guessed: the browser test saves every notebook it executes with per-cell timing
(build/executed/), and `python -m distlab.course record build/executed` turns them into docs/timings.json
and the instructor guide's timing table.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
TIMINGS = REPO / "docs" / "timings.json"
GUIDE = REPO / "docs" / "instructor.md"
LINK = re.compile(r"\[([^\]]+)\]\(([0-9]\w*_\w+\.ipynb)\)")

# Paths through the course; each notebook's own run time is measured, the rest of a path's time is
# reading, predicting and the lab.
PATHS = {
    "90-minute lab": ["00_start_here", "01_parallelism_patterns", "02_communication", "04_decentralized_gossip"],
    "3-hour lab": ["00_start_here", "01_parallelism_patterns", "02_communication", "03_parameter_server",
                   "04_decentralized_gossip", "05_federated_learning", "06_optimizers",
                   "08_pipeline_and_tensor_parallel", "13_memory_and_sharding"],
}
PATH_MINUTES = {"90-minute lab": 90, "3-hour lab": 180}


@dataclass
class Lesson:
    """One notebook as the course map shows it."""

    stem: str
    title: str
    objectives: list[str]
    prerequisites: list[str]  # stems
    next: list[str]  # stems

    @property
    def file(self) -> str:
        return f"{self.stem}.ipynb"


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def read_lesson(path: Path) -> Lesson:
    """Parse a notebook's opening cell and its "What next" cell; ValueError says what is missing."""
    cells = [_source(c) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]
    opening = cells[0] if cells else ""
    title = re.match(r"#\s+(.+)", opening)
    objectives = re.search(r"\*\*You will\*\*\s*\n((?:\s*[-*] .+\n?)+)", opening)
    before = re.search(r"\*\*Before this:\*\*(.*)", opening)
    after = next((c for c in cells if c.lstrip().startswith("## What next")), None)
    missing = [what for what, found in (("a '# NN · Title' line", title), ("a '**You will**' list", objectives),
                                        ("a '**Before this:**' line", before), ("a '## What next' cell", after))
               if not found]
    if missing:
        raise ValueError(f"{path.name} lacks {', '.join(missing)} (see distlab/course.py)")
    return Lesson(path.stem, title.group(1).strip(),
                  [line.strip()[2:].strip() for line in objectives.group(1).strip().splitlines()],
                  [Path(f).stem for _, f in LINK.findall(before.group(1))],
                  [Path(f).stem for _, f in LINK.findall(after)])


def lessons(folder: Path = NOTEBOOKS) -> list[Lesson]:
    """Every numbered notebook, in course order."""
    return [read_lesson(p) for p in sorted(folder.glob("[0-9]*.ipynb"))]


def problems(course: list[Lesson]) -> list[str]:
    """Links to notebooks that do not exist, and prerequisites that come later in the course."""
    order = {lesson.stem: i for i, lesson in enumerate(course)}
    found = []
    for lesson in course:
        for stem in lesson.prerequisites + lesson.next:
            if stem not in order:
                found.append(f"{lesson.file} links to {stem}.ipynb, which does not exist")
        for stem in lesson.prerequisites:
            if order.get(stem, -1) >= order[lesson.stem]:
                found.append(f"{lesson.file} needs {stem}.ipynb first, which comes at or after it in the course")
    for name, stems in PATHS.items():
        found += [f"path {name!r} names {s}.ipynb, which does not exist" for s in stems if s not in order]
    return found


# -- timings -------------------------------------------------------------------------------------------

def _seconds(cell: dict) -> float | None:
    times = cell.get("metadata", {}).get("execution", {})
    if "iopub.execute_input" not in times or "shell.execute_reply" not in times:
        return None
    start, end = (datetime.fromisoformat(times[k].replace("Z", "+00:00"))
                  for k in ("iopub.execute_input", "shell.execute_reply"))
    return (end - start).total_seconds()


def measure(executed: Path) -> dict:
    """An executed notebook's Run All time, its slowest cells, and what the browser test sampled."""
    cells = json.loads(executed.read_text())["cells"]
    timed = [(i, s, _source(c).strip().splitlines()[0][:70]) for i, c in enumerate(cells)
             if c["cell_type"] == "code" and (s := _seconds(c)) is not None]
    if not timed:
        raise ValueError(f"{executed.name} has no cell timings: was it executed with recordTiming?")
    sampled = json.loads(executed.with_suffix(".json").read_text())
    return {"run_all_s": round(sum(s for _, s, _ in timed), 1), "with_browser_s": round(sampled["seconds"], 1),
            "cpu_s": round(sampled["cpu_seconds"], 1), "peak_rss_mb": round(sampled["peak_rss_mb"]),
            "slowest": [{"cell": i, "seconds": round(s, 1), "starts": line}
                        for i, s, line in sorted(timed, key=lambda t: -t[1])[:2]]}


def record(executed: Path, machine: str, out: Path = TIMINGS) -> dict:
    """Write docs/timings.json from a folder of executed notebooks and refresh the guide's table."""
    timings = {"machine": machine, "measured": datetime.now().strftime("%Y-%m-%d"),
               "notebooks": {p.stem: measure(p) for p in sorted(executed.glob("*.ipynb"))
                             if p.with_suffix(".json").exists()}}
    out.write_text(json.dumps(timings, indent=1, ensure_ascii=False) + "\n")
    GUIDE.write_text(with_timing_table(GUIDE.read_text(), timings))
    return timings


def load_timings(path: Path = TIMINGS) -> dict:
    return json.loads(path.read_text())


def minutes(stem: str, timings: dict) -> float | None:
    """Measured Run All minutes; where only the browser test's wall time was kept, that (an upper bound)."""
    entry = timings["notebooks"].get(stem)
    if entry is None:
        return None
    return (entry["run_all_s"] if entry.get("run_all_s") is not None else entry["with_browser_s"]) / 60


# -- what the index and the guide show -----------------------------------------------------------------

def course_map(course: list[Lesson] | None = None, timings: dict | None = None):
    """One row per notebook: title (linked), objectives, prerequisites, measured Run All minutes."""
    import pandas as pd

    course, timings = course or lessons(), timings or load_timings()
    rows = [{"notebook": f"[{lesson.title}]({lesson.file})",
             "you will": "<br>".join("• " + objective.rstrip(";.") for objective in lesson.objectives),
             "before this": ", ".join(s[:3].strip("_") for s in lesson.prerequisites) or "—",
             "Run All (min)": round(m, 1) if (m := minutes(lesson.stem, timings)) is not None else None}
            for lesson in course]
    return pd.DataFrame(rows)


def paths(course: list[Lesson] | None = None, timings: dict | None = None):
    """Each path: its notebooks, their measured Run All minutes together, the time left for reading and labs."""
    import pandas as pd

    course, timings = course or lessons(), timings or load_timings()
    every = {**PATHS, "full course": [lesson.stem for lesson in course]}
    rows = []
    for name, stems in every.items():
        running = sum(minutes(s, timings) or 0 for s in stems)
        rows.append({"path": name, "notebooks": " → ".join(s.split("_")[0] for s in stems),
                     "Run All (min, measured)": round(running, 1), "length (min)": PATH_MINUTES.get(name),
                     "left for reading and labs (min)": round(PATH_MINUTES[name] - running) if name in PATH_MINUTES
                     else None})
    return pd.DataFrame(rows).astype(object).fillna("—")  # "—" in number columns


def map_markdown(course: list[Lesson] | None = None, timings: dict | None = None) -> str:
    """The course map as a markdown table with links (what the index notebook displays)."""
    table = course_map(course, timings)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for row in table.itertuples(index=False):
        cells = ["—" if value is None or value != value else str(value) for value in row]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def _short(title: str, most: int = 42) -> str:
    return title if len(title) <= most else title[:most - 1].rstrip() + "…"


def run_time_figure(course: list[Lesson] | None = None, timings: dict | None = None):
    """Measured Run All minutes per notebook, one bar each, marked by the shortest path it belongs to."""
    import plotly.graph_objects as go

    course, timings = course or lessons(), timings or load_timings()
    fig = go.Figure()
    for name in [*PATHS, "full course"]:
        shorter = {s for p in list(PATHS)[:list(PATHS).index(name)] for s in PATHS[p]} if name in PATHS else \
            {s for stems in PATHS.values() for s in stems}
        members = [lesson for lesson in course if lesson.stem not in shorter
                   and (name == "full course" or lesson.stem in PATHS[name])]
        fig.add_bar(name=name, y=[_short(lesson.title) for lesson in members], orientation="h",
                    x=[minutes(lesson.stem, timings) for lesson in members])
    fig.update_layout(title=f"Run All time per notebook (measured on {timings['machine'].split('(')[0].strip()})",
                      xaxis_title="minutes", height=560,
                      yaxis={"categoryorder": "array", "categoryarray": [_short(lesson.title) for lesson in course],
                             "autorange": "reversed", "title": None},
                      legend_title="first path that includes it", barmode="stack")
    return fig


def classroom(timings: dict | None = None, cores: int = 16, memory_gb: float = 64, ranks: int = 4) -> dict:
    """How many students one server carries, from the measured CPU seconds and memory of a Run All.

    Two bounds: everyone presses Run All at once (each student's ranks then get cores/students cores and
    the memory must hold every notebook at its peak), and the average load of a lab where each student
    runs each notebook of the 3-hour path once.
    """
    timings = timings or load_timings()
    measured = [t for t in timings["notebooks"].values() if t.get("cpu_s") is not None]
    if not measured:
        return None
    heaviest_mb = max(t["peak_rss_mb"] for t in measured)
    path_cpu = sum(timings["notebooks"][s]["cpu_s"] for s in PATHS["3-hour lab"] if s in timings["notebooks"])
    return {"cores": cores, "memory_gb": memory_gb, "ranks": ranks,
            "at_once_full_speed": cores // ranks, "at_once_by_memory": int(memory_gb * 1024 // heaviest_mb),
            "heaviest_notebook_mb": heaviest_mb, "three_hour_path_cpu_s": round(path_cpu),
            "three_hour_lab_by_cpu": int(cores * 180 * 60 // max(path_cpu, 1))}


def timing_table(timings: dict) -> str:
    """The guide's per-notebook table (markdown), from docs/timings.json."""
    lines = [f"Measured by the test suite's browser run on {timings['machine']} ({timings['measured']}).", "",
             "| notebook | Run All | with JupyterLab start | CPU time | peak memory | slowest cells |",
             "|---|---|---|---|---|---|"]
    def shown(value, unit):
        return "—" if value is None else f"{value:,.0f} {unit}"

    for stem, t in timings["notebooks"].items():
        slow = "; ".join(f"cell {c['cell']} ({c['seconds']:.0f} s): `{c['starts'].replace('|', '/')}`"
                         for c in t.get("slowest") or [])
        lines.append(f"| [{stem}](../notebooks/{stem}.ipynb) | {shown(t.get('run_all_s'), 's')} | "
                     f"{shown(t['with_browser_s'], 's')} | {shown(t.get('cpu_s'), 's')} | "
                     f"{shown(t.get('peak_rss_mb'), 'MB')} | {slow or '—'} |")
    return "\n".join(lines)


def with_timing_table(guide: str, timings: dict) -> str:
    """The guide's text with the table between its timing markers replaced."""
    start, end = "<!-- timings: written by `python -m distlab.course record` -->", "<!-- /timings -->"
    if start not in guide or end not in guide:
        raise ValueError(f"the guide has no {start} ... {end} markers")
    head, rest = guide.split(start, 1)
    return f"{head}{start}\n{timing_table(timings)}\n{end}{rest.split(end, 1)[1]}"


if __name__ == "__main__":  # python -m distlab.course record build/executed "2-core Intel Xeon VM, no GPU"
    if len(sys.argv) != 4 or sys.argv[1] != "record":
        sys.exit("usage: python -m distlab.course record <executed-notebooks-folder> <machine description>")
    written = record(Path(sys.argv[2]), sys.argv[3])
    print(f"{TIMINGS}: {len(written['notebooks'])} notebooks; {GUIDE} table refreshed")
