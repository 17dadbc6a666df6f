"""Figures of the replicated store's consistency modes: what each mode costs and what it lets a reader see."""

from __future__ import annotations

import math

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from distlab.consistency.checker import stale_reads
from distlab.consistency.store import History

from .architectures import in_time_order, loss_figure

MODE_COLOURS = {"strong": qualitative.Plotly[0], "weak": qualitative.Plotly[1], "eventual": qualitative.Plotly[2]}
KIND_COLOURS = {"read": "#636efa", "write": "#ef553b", "reply": "#b6b6b6", "replicate": "#ab63fa",
                "update": "#ffa15a", "gossip": "#00cc96"}


def modes_figure(summaries: list[dict]) -> go.Figure:
    """Stale-read rate, time to convergence, messages per operation (by kind) and latency, per mode."""
    modes = [s["mode"] for s in summaries]
    colours = [MODE_COLOURS.get(m, "grey") for m in modes]
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.2, subplot_titles=(
        "stale-read rate", "time to convergence after writes stop", "messages per operation, by kind",
        "median latency of a read / a write"))
    labelled = {"marker_color": colours, "showlegend": False, "textposition": "outside", "cliponaxis": False}
    rates = [s["stale_read_rate"] for s in summaries]
    fig.add_bar(x=modes, y=rates, text=[f"{r:.0%}" for r in rates], row=1, col=1, **labelled)
    converge_ms = [1000 * (s["convergence_s"] or 0) for s in summaries]
    fig.add_bar(x=modes, y=converge_ms, text=[f"{ms:.1f} ms" for ms in converge_ms], row=1, col=2, **labelled)
    kinds = sorted({k[4:] for s in summaries for k in s if k.startswith("msg/")})
    ops = [s["reads"] + s["writes"] for s in summaries]
    for kind in kinds:
        fig.add_bar(x=modes, y=[s.get(f"msg/{kind}", 0) / n for s, n in zip(summaries, ops)], name=kind,
                    marker_color=KIND_COLOURS.get(kind), legendgroup="messages", row=2, col=1)
    fig.add_bar(x=[[m for m in modes for _ in "rw"], ["read", "write"] * len(modes)],
                y=[s[f"{op}_ms"] for s in summaries for op in ("read", "write")],
                marker_color=[c for c in colours for _ in "rw"], showlegend=False, row=2, col=2)
    fig.update_layout(barmode="stack", height=640, title="Consistency modes: what a reader sees, what it costs",
                      legend_title_text="message kind")
    for i, label in enumerate(("fraction of reads", "ms", "messages / operation", "ms")):
        fig.update_yaxes(title_text=label, row=i // 2 + 1, col=i % 2 + 1)
        fig.update_xaxes(title_text="mode", row=i // 2 + 1, col=i % 2 + 1)
    fig.update_yaxes(rangemode="tozero")
    return fig


def timeline_figure(history: History, key: str, first_ms: float = 60.0) -> go.Figure:
    """Every operation on `key` in the first `first_ms` ms: a bar from invoke to complete, one row per rank.

    Writes carry their value; stale reads (older than a write completed before they began) are red.
    """
    ops = [op for op in history.ops if op.key == key]
    start = min(op.invoke for op in history.ops)
    ops = [op for op in ops if 1000 * (op.invoke - start) <= first_ms]
    stale = set(stale_reads(history.ops))
    groups = {"write": [], "fresh read": [], "stale read": []}
    for op in ops:
        group = "write" if op.kind == "write" else ("stale read" if op in stale else "fresh read")
        groups[group].append(op)
    colours = {"write": "#ef553b", "fresh read": "#636efa", "stale read": "#d62728"}
    fig = go.Figure()
    for group, members in groups.items():
        xs, ys, text = [], [], []
        for op in members:
            a, b = 1000 * (op.invoke - start), 1000 * (op.complete - start)
            b = max(b, a + 0.15)  # a local read takes microseconds: keep it visible
            label = f"{op.kind} {op.value} @ {op.version}"
            xs += [a, b, None]
            ys += [op.rank, op.rank, None]
            text += [label, label, None]
        fig.add_scatter(x=xs, y=ys, mode="lines+markers", name=group, text=text, hoverinfo="text",
                        line={"width": 10 if group == "write" else 6, "color": colours[group]},
                        marker={"size": 4})
    fig.update_layout(title=f"{history.mode}: operations on {key} (first {first_ms:.0f} ms)", height=300,
                      xaxis_title="time since the first operation (ms)", yaxis_title="rank",
                      yaxis={"dtick": 1})
    return fig


def sweep_figure(rows: list[dict], x: str, x_label: str) -> go.Figure:
    """Stale-read rate and time to convergence against one knob (propagation delay, gossip interval)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("stale-read rate", "time to convergence"))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        style = {"name": mode, "line": {"color": MODE_COLOURS.get(mode)}, "mode": "lines+markers"}
        fig.add_scatter(x=[1000 * r[x] for r in mine], y=[r["stale_read_rate"] for r in mine], row=1, col=1,
                        **style)
        fig.add_scatter(x=[1000 * r[x] for r in mine], y=[1000 * (r["convergence_s"] or 0) for r in mine],
                        row=1, col=2, showlegend=False, **style)
    fig.update_xaxes(title_text=x_label)
    fig.update_yaxes(title_text="fraction of reads", row=1, col=1)
    fig.update_yaxes(title_text="ms", row=1, col=2)
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(title=f"Staleness against {x_label}", height=360)
    return fig


def training_figure(runs: dict[str, list[dict]], smooth: int = 5) -> go.Figure:
    """Loss against iteration and against wall time, one line per staleness bound (runs: label -> the
    results of distlab.architectures.staleness.train); the loss is a rolling mean over `smooth` iterations."""
    return loss_figure(runs, smooth, title="BSP, SSP and ASP with a straggler")


def bound_label(s: float) -> str:
    return "∞" if s == math.inf else f"{s:g}"


def final_loss(results: list[dict], last: int = 10) -> float:
    """Mean minibatch loss of the last `last` iterations (last·workers minibatches, in time order)."""
    steps = in_time_order(results)
    return float(steps["loss"].tail(last * steps["rank"].nunique()).mean())


def staleness_knob(runs: dict[float, list[dict]], smooth: int = 5) -> widgets.VBox:
    """A slider over the staleness bounds s that were run (runs: s -> the results of
    distlab.architectures.staleness.train): wall time and final loss against s, the chosen s marked, and that
    run's loss against wall time. It redraws from the runs already made; a move launches nothing."""
    bounds = sorted(runs)
    labels = [bound_label(s) for s in bounds]
    walls = [max(r["wall_s"] for r in runs[s] if r["role"] == "worker") for s in bounds]
    losses = [final_loss(runs[s]) for s in bounds]
    fig = go.FigureWidget(make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
        "wall time against s", "final loss against s", "loss of the chosen run")))
    line = {"mode": "lines+markers", "showlegend": False, "line": {"color": "grey"}}
    ring = {"size": 16, "color": "#d62728", "symbol": "circle-open", "line": {"width": 3}}
    chosen = {"mode": "markers", "showlegend": False, "marker": ring}
    fig.add_scatter(x=labels, y=walls, row=1, col=1, **line)
    fig.add_scatter(x=labels[:1], y=walls[:1], row=1, col=1, **chosen)
    fig.add_scatter(x=labels, y=losses, row=1, col=2, **line)
    fig.add_scatter(x=labels[:1], y=losses[:1], row=1, col=2, **chosen)
    fig.add_scatter(x=[], y=[], row=1, col=3, mode="lines", showlegend=False, line={"color": "#d62728"})
    fig.update_xaxes(title_text="staleness bound s (clocks)", type="category", row=1, col=1)
    fig.update_xaxes(title_text="staleness bound s (clocks)", type="category", row=1, col=2)
    fig.update_xaxes(title_text="wall time (s)", rangemode="tozero", row=1, col=3)
    fig.update_yaxes(title_text="seconds", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="training loss (mean of the last 10 iterations)", row=1, col=2)
    fig.update_yaxes(title_text=f"training loss (rolling mean of {smooth})", row=1, col=3)
    fig.update_layout(height=380, title="The staleness bound s: wall time and loss, measured in the runs above")
    slider = widgets.SelectionSlider(options=list(zip(labels, bounds)), value=bounds[0], description="s",
                                     continuous_update=False)

    def show(s: float) -> None:
        i, steps = bounds.index(s), in_time_order(runs[s])
        curve = steps["loss"].rolling(smooth * steps["rank"].nunique(), min_periods=1).mean()
        with fig.batch_update():
            fig.data[1].x, fig.data[1].y = [labels[i]], [walls[i]]
            fig.data[3].x, fig.data[3].y = [labels[i]], [losses[i]]
            fig.data[4].x, fig.data[4].y = list(steps["t"]), list(curve)
            fig.layout.annotations[2].text = f"loss of the run with s = {labels[i]}"

    slider.observe(lambda change: show(change["new"]), names="value")
    show(bounds[0])
    return widgets.VBox([slider, fig])


FAULT_MODE_COLOURS = {**MODE_COLOURS, "quorum R=2 W=2": qualitative.Plotly[3], "quorum R=1 W=1": qualitative.Plotly[4]}


def faults_figure(table) -> go.Figure:
    """Availability during the faults and stale-read rate, per mode (bars) under each schedule (groups); the
    text on a bar says whether the linearizability search found an order (✓) or not (✗). `table`:
    distlab.consistency.experiments.fault_table."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "operations answered while the faults held", "stale reads (of the reads answered)"))
    rows = table.reset_index()
    for mode in dict.fromkeys(rows["mode"]):
        mine = rows[rows["mode"] == mode]
        marks = ["✓" if r == "linearizable" else "✗" for r in mine["linearizable"]]
        style = {"name": mode, "marker_color": FAULT_MODE_COLOURS.get(mode), "legendgroup": mode,
                 "text": marks, "textposition": "outside", "cliponaxis": False}
        during = mine["availability_during_fault"].fillna(mine["availability"])  # "none": the whole run
        fig.add_bar(x=mine["schedule"], y=during, row=1, col=1, **style)
        fig.add_bar(x=mine["schedule"], y=mine["stale_read_rate"], row=1, col=2, showlegend=False, **style)
    fig.update_xaxes(title_text="fault schedule")
    fig.update_yaxes(title_text="fraction of operations", range=[0, 1.12], row=1, col=1)
    fig.update_yaxes(title_text="fraction of reads", rangemode="tozero", row=1, col=2)
    fig.update_layout(barmode="group", height=420, legend_title_text="mode (✓ linearizable, ✗ not)",
                      title="Under faults: who answers, who reads the past")
    return fig


OUTCOME_COLOURS = {"ok": "#636efa", "unknown": "#ffa15a", "failed": "#d62728", "stale": "#ab63fa"}


def fault_timeline_figure(run) -> go.Figure:
    """Every operation of a FaultRun (distlab.consistency.experiments) as a bar from invoke to complete, one row
    per rank, coloured by outcome (answered, stale, timed out with unknown outcome, refused); the faults shaded."""
    stale = set(stale_reads(run.history.ops))
    fig = go.Figure()
    groups = {"answered": [], "stale read": [], "unknown outcome": [], "failed": []}
    for op in run.history.ops:
        group = {"unknown": "unknown outcome", "failed": "failed"}.get(op.outcome, "answered")
        groups["stale read" if op in stale else group].append(op)
    colours = dict(zip(groups, (OUTCOME_COLOURS[k] for k in ("ok", "stale", "unknown", "failed"))))
    for group, members in groups.items():
        xs, ys, text = [], [], []
        for op in members:
            a, b = 1000 * (op.invoke - run.t0), 1000 * (op.complete - run.t0)
            label = f"{op.kind} {op.key}={op.value} ({op.outcome})"
            xs += [a, max(b, a + 0.5), None]
            ys += [op.rank, op.rank, None]
            text += [label, label, None]
        fig.add_scatter(x=xs, y=ys, mode="lines", name=group, text=text, hoverinfo="text",
                        line={"width": 12, "color": colours[group]})
    start, end = run.window()
    if end > start:  # the faults, as a filled trace (a layout shape would cost seconds of plotly imports)
        a, b, low, high = 1000 * start, 1000 * end, -0.5, max(op.rank for op in run.history.ops) + 0.5
        fig.add_scatter(x=[a, b, b, a, a], y=[low, low, high, high, low], fill="toself", mode="lines",
                        fillcolor="rgba(128,128,128,0.15)", line={"width": 0}, name=run.schedule.name,
                        hoverinfo="name")
    fig.update_layout(title=f"{run.label} under {run.schedule.name}: every operation", height=300,
                      xaxis_title="time since the start (ms)", yaxis_title="rank", yaxis={"dtick": 1})
    return fig


def network_panel(control, world_size: int) -> widgets.VBox:
    """Buttons that partition, drop, delay, pause or heal the store's network while its workload runs."""
    alone = widgets.Dropdown(options=list(range(world_size)), value=world_size - 1, description="rank")
    fraction = widgets.IntSlider(value=30, min=0, max=100, step=10, description="drop (%)")
    delay = widgets.IntSlider(value=50, min=0, max=300, step=10, description="delay (ms)")
    pause = widgets.IntSlider(value=500, min=100, max=2000, step=100, description="pause (ms)")
    log = widgets.HTML("The network is perfect. Start the workload below, then order faults here.")

    def partition():
        rest = tuple(r for r in range(world_size) if r != alone.value)
        return "partition", {"groups": (rest, (alone.value,))}, f"rank {alone.value} cut off from {rest}"

    orders = {  # button -> what it orders now: (kind, the event's fields, what the log says)
        "Partition": partition,
        "Drop": lambda: ("drop", {"fraction": fraction.value / 100}, f"drop {fraction.value}% of messages"),
        "Delay": lambda: ("delay", {"ms": float(delay.value)}, f"delay each message up to {delay.value} ms"),
        "Pause": lambda: ("pause", {"rank": alone.value, "seconds": pause.value / 1000},
                          f"pause rank {alone.value} for {pause.value} ms"),
        "Heal": lambda: ("heal", {}, "heal: a perfect network"),
    }

    def on_click(label):
        def click(_button):
            kind, fields, said = orders[label]()
            control.order(kind, **fields)
            log.value = f"Ordered: {said} ({len(control.orders)} orders so far)"
        return click

    buttons = []
    for label in orders:
        button = widgets.Button(description=label, button_style="success" if label == "Heal" else "warning")
        button.on_click(on_click(label))
        buttons.append(button)
    return widgets.VBox([widgets.HBox([alone, fraction]), widgets.HBox([delay, pause]), widgets.HBox(buttons), log])
