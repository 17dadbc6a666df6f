"""Build the course as a static website with Jupyter Book 1, from notebooks that were already executed.

    python book/build.py [--executed build/executed] [--out build/book]    ->  build/book/html/index.html

CI's browser test executes every notebook once and saves it to build/executed/; this script does not run
them again (`execute_notebooks: off`). It prepares a copy of each one that reads offline:

  - a plotly output (application/vnd.plotly.v1+json) becomes HTML drawn by the plotly.js that ships in the
    plotly package, copied into the site's _static/ (no CDN);
  - an ipywidgets output cannot run without a kernel: it becomes what its saved state shows (the figures of
    plotly FigureWidgets, the outputs of Output widgets, HTML and progress text) and, where it holds a
    control (a slider, a button), the note "(interactive control — run the notebook to use it)".

The source tree keeps the repository's layout (notebooks/, docs/) so the links between notebooks and the
glossary resolve as they do on disk.
"""
from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import sys
from itertools import groupby
from pathlib import Path

import nbformat
import plotly
import plotly.graph_objects as go
import plotly.io as pio

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO / "book"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
CONTROL_NOTE = "(interactive control — run the notebook to use it)"
MODEL_REF = re.compile(r"^IPY_MODEL_(\w+)$")


# ------------------------------------------------------------------------------------------ figures
def figure_html(figure: dict) -> str:
    """A plotly figure as a <div> and the script that draws it with the page's plotly.js."""
    fig = go.Figure(figure, skip_invalid=True)
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, config={"responsive": True})


def html_output(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_output("display_data", data={"text/html": text})


# ------------------------------------------------------------------------------------------ widgets
def model_refs(value) -> list[str]:
    """Ids of the widget models a state value points at ("IPY_MODEL_<id>"), in order."""
    if isinstance(value, str):
        m = MODEL_REF.match(value)
        return [m.group(1)] if m else []
    if isinstance(value, list):
        return [ref for v in value for ref in model_refs(v)]
    if isinstance(value, dict):
        return [ref for v in value.values() for ref in model_refs(v)]
    return []


def widget_outputs(model_id: str, state: dict, seen: set[str] | None = None) -> tuple[list, bool]:
    """What a widget's saved state shows, as static outputs (str for inline HTML), and whether it holds a
    control.

    An Output widget gives its own (prepared) outputs; HTML, labels and progress bars their text; a model
    with a `disabled` trait (sliders, dropdowns, buttons) is a control. A FigureWidget gives its figure
    only while the saved state is the figure: the state keeps the traces it was built with, not the edits
    sent to it later (a live dashboard's), so an edited one is a control too."""
    seen = set() if seen is None else seen
    if model_id in seen or model_id not in state:
        return [], False
    seen.add(model_id)
    model = state[model_id]
    name, s = model.get("model_name", ""), model.get("state", {})
    if "_widget_data" in s and "_widget_layout" in s:  # plotly.graph_objects.FigureWidget
        edited = int(s.get("_last_trace_edit_id", 0)) or int(s.get("_last_layout_edit_id", 0))
        if edited or not s["_widget_data"]:
            return [], True
        return [html_output(figure_html({"data": s["_widget_data"], "layout": s["_widget_layout"]}))], False
    if name == "OutputModel":
        return prepared_outputs(s.get("outputs", []), state), False
    outs, control = [], "disabled" in s
    if name in ("HTMLModel", "HTMLMathModel") and s.get("value"):
        outs.append(s["value"])
    if name == "LabelModel" and s.get("value"):
        outs.append(html.escape(s["value"]))
    if name in ("FloatProgressModel", "IntProgressModel") and s.get("max"):
        outs.append(f"<progress value='{s.get('value', 0)}' max='{s['max']}'></progress>")
    for ref in model_refs({k: v for k, v in s.items() if k not in ("layout", "style")}):
        more, more_control = widget_outputs(ref, state, seen)
        outs += more
        control |= more_control
    return outs, control


def static_widget(model_id: str, state: dict) -> list:
    """A widget output replaced by what it shows; runs of inline HTML joined into one output."""
    shown, control = widget_outputs(model_id, state)
    shown += [f"<p><em>{CONTROL_NOTE}</em></p>"] if control else []
    result = []
    for is_text, group in groupby(shown, key=lambda item: isinstance(item, str)):
        items = list(group)
        result += [html_output(" ".join(items))] if is_text else items
    return result


# ------------------------------------------------------------------------------------------ notebooks
def prepared_outputs(outputs: list, state: dict) -> list:
    """Outputs that render without a kernel or a CDN: plotly as HTML, widgets as what they show."""
    result = []
    for out in outputs:
        data = out.get("data", {})
        if PLOTLY_MIME in data:
            result.append(html_output(figure_html(data[PLOTLY_MIME])))
        elif WIDGET_MIME in data:
            result += static_widget(data[WIDGET_MIME]["model_id"], state)
        else:
            result.append(out)
    return result


def prepare_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook with every output made static, and the (large, now unused) widget state dropped."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = prepared_outputs(cell.get("outputs", []), state)
    nb.metadata.pop("widgets", None)
    return nb


def has_code(nb: nbformat.NotebookNode) -> bool:
    return any(c.cell_type == "code" and c.source.strip() for c in nb.cells)


def source_notebook(path: Path, executed: Path) -> nbformat.NotebookNode:
    """The executed copy of a notebook; a notebook without code (the map) may come straight from notebooks/."""
    done = executed / path.name
    if done.exists():
        return nbformat.read(done, as_version=4)
    nb = nbformat.read(path, as_version=4)
    if has_code(nb):
        raise SystemExit(f"{done} is missing: run the notebook tests first (they save every notebook there), "
                         f"or pass --executed DIR")
    return nb


def check_toc(notebooks: list[Path], docs: list[Path]) -> None:
    """Every notebook and every docs page must be in book/_toc.yml: a page outside it would not be built."""
    toc = (BOOK / "_toc.yml").read_text()
    listed = set(re.findall(r"(?:root|file):\s*(\S+)", toc))
    missing = [f"notebooks/{p.stem}" for p in notebooks if f"notebooks/{p.stem}" not in listed]
    missing += [f"docs/{p.stem}" for p in docs if f"docs/{p.stem}" not in listed]
    absent = sorted(listed - {f"notebooks/{p.stem}" for p in notebooks} - {f"docs/{p.stem}" for p in docs})
    if missing or absent:
        raise SystemExit(f"book/_toc.yml is out of date: not listed {missing}, listed but not found {absent}")


def prepare_source(src: Path, executed: Path, notebooks: Path, docs: Path) -> None:
    """The Jupyter Book source folder: config, toc, plotly.js, prepared notebooks, docs pages."""
    shutil.rmtree(src, ignore_errors=True)
    (src / "_static").mkdir(parents=True)
    (src / "notebooks").mkdir()
    (src / "docs").mkdir()
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(BOOK / name, src / name)
    shutil.copy(Path(plotly.__file__).parent / "package_data" / "plotly.min.js", src / "_static" / "plotly.min.js")
    paths, pages = sorted(notebooks.glob("*.ipynb")), sorted(docs.glob("*.md"))
    check_toc(paths, pages)
    for path in paths:
        nbformat.write(prepare_notebook(source_notebook(path, executed)), src / "notebooks" / path.name)
    for page in pages:
        shutil.copy(page, src / "docs" / page.name)


def build(executed: Path, out: Path, notebooks: Path = REPO / "notebooks", docs: Path = REPO / "docs") -> Path:
    """Prepare the source in out/src and build it; returns the site's folder (out/html)."""
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    if not jupyter_book.exists():
        raise SystemExit("Jupyter Book is not installed here: pip install -e '.[book]' (`make book` does it)")
    src = out / "src"
    prepare_source(src, executed, notebooks, docs)
    cmd = [str(jupyter_book), "build", str(src), "--path-output", str(out), "--builder", "html"]
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
    site = out / "html"
    shutil.rmtree(site, ignore_errors=True)
    (out / "_build" / "html").rename(site)
    return site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executed", type=Path, default=REPO / "build" / "executed",
                        help="folder of executed notebooks (default: build/executed, saved by the notebook tests)")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "book", help="output folder (site in OUT/html)")
    parser.add_argument("--notebooks", type=Path, default=REPO / "notebooks", help="folder of the notebooks")
    parser.add_argument("--docs", type=Path, default=REPO / "docs", help="folder of the Markdown pages")
    args = parser.parse_args()
    site = build(args.executed, args.out, args.notebooks, args.docs)
    print(f"site: {site / 'index.html'}")


if __name__ == "__main__":
    main()
