"""Figures for pipeline and tensor parallelism: the Gantt chart of a schedule, the bubble measured beside
(p-1)/(m+p-1), activation memory per stage, bytes per mesh axis, and the latency-throughput trade-off; two
knobs: the bubble over p and m (formula, ideal timeline and the notebook's measured runs), and the micro-batch
size of pipelined serving (its measured latency and throughput)."""

from __future__ import annotations

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from ..parallel import pipeline as pp

SCHEDULE_NAMES = {"gpipe": "GPipe", "1f1b": "1F1B"}

KIND = {"F": ("forward", "#4C78A8"), "B": ("backward", "#F58518")}


def gantt(events: list[dict], title: str = "pipeline schedule") -> go.Figure:
    """One row per stage, one bar per forward (blue) / backward (orange), labelled by micro-batch."""
    fig = go.Figure()
    for kind, (name, colour) in KIND.items():
        rows = [e for e in events if e["kind"] == kind]
        if not rows:
            continue
        fig.add_bar(
            y=[f"stage {e['stage']}" for e in rows], x=[1000 * (e["end"] - e["start"]) for e in rows],
            base=[1000 * e["start"] for e in rows], orientation="h", name=name, marker_color=colour,
            text=[str(e["micro"]) for e in rows], textposition="inside", insidetextanchor="middle",
            hovertemplate="micro-batch %{text}<br>%{base:.1f} ms + %{x:.1f} ms<extra>" + name + "</extra>")
    stages = sorted({e["stage"] for e in events})
    fig.update_layout(title=title, barmode="overlay", height=120 + 45 * len(stages), margin=dict(t=50, b=40),
                      xaxis_title="time since the step started (ms)", yaxis_title="stage",
                      yaxis=dict(categoryorder="array", categoryarray=[f"stage {s}" for s in reversed(stages)]))
    return fig


def bubble(rows: list[dict], title: str = "pipeline bubble: measured vs (p-1)/(m+p-1)") -> go.Figure:
    """rows: dicts with m, measured, predicted (one per micro-batch count)."""
    table = pd.DataFrame(rows).sort_values("m")
    fig = go.Figure()
    fig.add_scatter(x=table["m"], y=table["predicted"], name="predicted (p-1)/(m+p-1)", mode="lines+markers",
                    line=dict(dash="dash", color="grey"))
    fig.add_scatter(x=table["m"], y=table["measured"], name="measured from timestamps", mode="lines+markers",
                    line=dict(color=qualitative.Plotly[1]))
    fig.update_layout(title=title, xaxis_title="micro-batches m", yaxis_title="idle fraction of the step",
                      xaxis=dict(type="log", tickvals=list(table["m"])), yaxis=dict(rangemode="tozero"))
    return fig


def memory(peaks: dict[str, list[int]], title: str = "peak activation memory per stage") -> go.Figure:
    """peaks: schedule name -> peak saved-activation bytes per stage."""
    fig = go.Figure()
    for i, (name, per_stage) in enumerate(peaks.items()):
        fig.add_bar(x=[f"stage {s}" for s in range(len(per_stage))], y=[b / 2**20 for b in per_stage], name=name,
                    marker_color=qualitative.Plotly[i])
    fig.update_layout(title=title, xaxis_title="stage", yaxis_title="activations held at peak (MiB)", barmode="group")
    return fig


def bytes_by_axis(comm: pd.DataFrame, title: str = "communication per mesh axis") -> go.Figure:
    """Bytes each rank sent or reduced, split by the comm table's tag (the mesh axis: dp, tp, pp)."""
    table = comm.groupby(["rank", "tag"])["bytes"].sum().unstack(fill_value=0)
    fig = go.Figure()
    for i, axis in enumerate(table.columns):
        fig.add_bar(x=[f"rank {r}" for r in table.index], y=table[axis] / 2**20, name=axis,
                    marker_color=qualitative.Plotly[i + 2])
    fig.update_layout(title=title, xaxis_title="rank", yaxis_title="MiB", barmode="stack")
    return fig


def latency_throughput(rows: list[dict], title: str = "serving: latency vs throughput") -> go.Figure:
    """rows: dicts with setup (e.g. 'pipelined, 2 stages'), micro_batch, latency_ms, throughput."""
    table = pd.DataFrame(rows)
    fig = go.Figure()
    for i, (setup, group) in enumerate(table.groupby("setup", sort=False)):
        group = group.sort_values("micro_batch")
        fig.add_scatter(x=group["throughput"], y=group["latency_ms"], name=setup, mode="lines+markers+text",
                        text=[f"b={b}" for b in group["micro_batch"]], textposition="top center",
                        line=dict(color=qualitative.Plotly[i]))
    fig.update_layout(title=title, xaxis_title="throughput (requests / s)",
                      yaxis_title="mean latency per request (ms)", xaxis=dict(rangemode="tozero"),
                      yaxis=dict(rangemode="tozero"))
    return fig


def loss_curves(curves: dict[str, list[float]], title: str = "training loss") -> go.Figure:
    """One line per setup (name -> loss per step); dashes let identical curves show through each other."""
    fig = go.Figure()
    for i, (name, losses) in enumerate(curves.items()):
        fig.add_scatter(x=list(range(len(losses))), y=losses, name=name, mode="lines",
                        line=dict(color=qualitative.Plotly[i], dash=["solid", "dash", "dot"][i % 3], width=3 - i % 3))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss (cross-entropy per character)")
    return fig


def bubble_curves(p: int, max_m: int = 32) -> dict[str, list[float]]:
    """Bubble fraction over m = 1..max_m on p stages: the formula, and each schedule's ideal timeline
    (`pp.simulate`, backward twice the forward) measured with the same rule as the real runs."""
    ms = range(1, max_m + 1)
    curves = {"formula": [pp.predicted_bubble(p, m) for m in ms]}
    for name in pp.SCHEDULES:
        curves[name] = [pp.bubble_fraction(pp.simulate(name, p, m), p) for m in ms]
    return curves


def _measured_at(measured: list[dict], p: int) -> dict[str, list[dict]]:
    """The notebook's measured rows on p stages, by schedule, sorted by m."""
    return {name: sorted((r for r in measured if r["p"] == p and r["schedule"] == name), key=lambda r: r["m"])
            for name in pp.SCHEDULES}


def bubble_figure(measured: list[dict], p: int, m: int, max_m: int = 32) -> go.Figure:
    """The bubble over m on p stages: (p-1)/(m+p-1), GPipe's and 1F1B's ideal timelines, the bubbles
    measured in real runs on p stages (rows with schedule, p, m, measured), and the chosen (p, m)."""
    ms, curves = list(range(1, max_m + 1)), bubble_curves(p, max_m)
    fig = go.Figure()
    fig.add_scatter(x=ms, y=curves["formula"], name="(p−1)/(m+p−1)", mode="lines", line=dict(color="grey", width=4))
    for i, name in enumerate(pp.SCHEDULES):
        fig.add_scatter(x=ms, y=curves[name], name=f"{SCHEDULE_NAMES[name]}, ideal timeline", mode="markers",
                        marker=dict(symbol=["circle-open", "x-thin-open"][i], size=9, color=qualitative.Plotly[i]))
    for i, (name, rows) in enumerate(_measured_at(measured, p).items()):
        fig.add_scatter(x=[r["m"] for r in rows], y=[r["measured"] for r in rows], mode="markers+lines",
                        name=f"{SCHEDULE_NAMES[name]}, measured on real ranks",
                        marker=dict(size=11, symbol="diamond", color=qualitative.Plotly[i + 3]))
    fig.add_scatter(x=[m], y=[pp.predicted_bubble(p, m)], name=f"chosen: p = {p}, m = {m}", mode="markers",
                    marker=dict(size=18, symbol="star", color="gold", line=dict(width=1, color="black")))
    fig.update_layout(title=f"pipeline bubble on p = {p} stages: formula, ideal timelines, measured runs",
                      xaxis_title="micro-batches m", yaxis_title="idle fraction of the step", height=420,
                      xaxis=dict(type="log", tickvals=[1, 2, 4, 8, 16, 32]), yaxis=dict(range=[0, 1]))
    return fig


def bubble_summary(measured: list[dict], p: int, m: int) -> str:
    """One line of HTML: the formula at (p, m) and what the real runs measured on p stages."""
    text = f"<b>p = {p}, m = {m}</b>: (p−1)/(m+p−1) = {p - 1}/{m + p - 1} = {pp.predicted_bubble(p, m):.3f}"
    here = [r for r in measured if r["p"] == p]
    if not here:
        runs = sorted({r["p"] for r in measured})
        return text + f" · no real run on {p} stages in this notebook (measured on p = {runs})"
    shown = ", ".join(f"{SCHEDULE_NAMES[r['schedule']]} m = {r['m']}: {r['measured']:.3f}"
                      for r in sorted(here, key=lambda r: (r["schedule"], r["m"])))
    return text + f" · measured on {p} real ranks: {shown}"


def bubble_explorer(measured: list[dict], p: int = 4, m: int = 8, max_p: int = 8, max_m: int = 32) -> widgets.VBox:
    """Sliders for p and m and a schedule: redraw the bubble over m (formula, ideal timelines, the measured
    runs at their (p, m)) and the chosen schedule's ideal timeline. Nothing launches: the runs are `measured`."""
    stages = widgets.IntSlider(value=p, min=2, max=max_p, description="stages p", continuous_update=False)
    micro = widgets.IntSlider(value=m, min=1, max=max_m, description="micro-batches m", continuous_update=False)
    schedule = widgets.Dropdown(options=[(v, k) for k, v in SCHEDULE_NAMES.items()], value="gpipe",
                                description="timeline")
    for w in (stages, micro, schedule):
        w.style = {"description_width": "110px"}
    said, curve, timeline = widgets.HTML(), go.FigureWidget(), go.FigureWidget()

    def replace(widget: go.FigureWidget, new: go.Figure) -> None:
        with widget.batch_update():
            widget.data = []
            widget.add_traces(new.data)
            widget.layout = new.layout

    def redraw(_=None) -> None:
        p, m = stages.value, micro.value
        replace(curve, bubble_figure(measured, p, m, max_m))
        ideal = pp.simulate(schedule.value, p, m, t_forward=0.001, t_backward=0.002)
        replace(timeline, gantt(ideal, f"ideal {SCHEDULE_NAMES[schedule.value]} timeline, p = {p}, m = {m}: forward "
                                       f"1 ms, backward 2 ms; bubble {pp.bubble_fraction(ideal, p):.3f}"))
        said.value = bubble_summary(measured, p, m)

    redraw()
    for w in (stages, micro, schedule):
        w.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox([stages, micro, schedule]), said, curve, timeline])


def micro_batch_figure(rows: list[dict], micro_batch: int, title: str) -> go.Figure:
    """latency_throughput's curves with the measured point of each setup at `micro_batch` marked."""
    fig = latency_throughput(rows, title)
    chosen = [r for r in rows if r["micro_batch"] == micro_batch]
    fig.add_scatter(x=[r["throughput"] for r in chosen], y=[r["latency_ms"] for r in chosen], mode="markers",
                    name=f"chosen: b = {micro_batch}", text=[r["setup"] for r in chosen],
                    marker=dict(size=20, symbol="circle-open", color="black", line=dict(width=3)),
                    hovertemplate="%{text}<br>%{x:.0f} requests/s, %{y:.2f} ms<extra></extra>")
    return fig


def micro_batch_explorer(rows: list[dict], micro_batch: int | None = None,
                         title: str = "serving: latency vs throughput, measured at each micro-batch size b"
                         ) -> widgets.VBox:
    """A slider over the micro-batch sizes measured (rows: setup, micro_batch, latency_ms, throughput), starting
    at `micro_batch` (default: the smallest): marks that size on the latency-throughput curves and says its
    numbers. Redraws from `rows` only."""
    sizes = sorted({r["micro_batch"] for r in rows})
    if micro_batch is not None and micro_batch not in sizes:
        raise ValueError(f"micro_batch={micro_batch} was not measured; choose one of {sizes}")
    pick = widgets.SelectionSlider(options=sizes, value=sizes[0] if micro_batch is None else micro_batch,
                                   description="micro-batch b", continuous_update=False,
                                   style={"description_width": "110px"})
    said, fig = widgets.HTML(), go.FigureWidget(micro_batch_figure(rows, pick.value, title))

    def redraw(_=None) -> None:
        chosen = [r for r in rows if r["micro_batch"] == pick.value]
        marked = fig.data[-1]
        with fig.batch_update():
            marked.x, marked.y = [r["throughput"] for r in chosen], [r["latency_ms"] for r in chosen]
            marked.text, marked.name = [r["setup"] for r in chosen], f"chosen: b = {pick.value}"
        said.value = f"<b>b = {pick.value}</b>: " + " · ".join(
            f"{r['setup']}: latency {r['latency_ms']:.2f} ms, {r['throughput']:,.0f} requests/s" for r in chosen)

    redraw()
    pick.observe(redraw, names="value")
    return widgets.VBox([pick, said, fig])
