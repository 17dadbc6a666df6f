"""Figures of the architectures: parameter-server runs (notebooks 03, 07) and the side-by-side
comparison of notebook 12.

Parameter server (architectures/parameter_server.py, staleness.py): loss against iterations and wall
time, staleness, who waited, and how much each link and server carried. Every function takes run
results (`run.results`, a list by rank) or a Run; the comparisons take a dict label -> results, e.g.
{"sync": sync_run, "async": async_run}.

Choosing an architecture (architectures/compare.py): one point or bar per architecture, from compare().
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..architectures.compare import ARCHITECTURES, PAYLOAD, busiest_bytes_per_sync
from .figures import _colour


def _results(source) -> list[dict]:
    return source.results if hasattr(source, "results") else source


def worker_steps(source) -> pd.DataFrame:
    """One row per worker step: rank, step, t (seconds since start), loss, clock_staleness, wait."""
    frames = [pd.DataFrame(r["steps"]).assign(rank=r["rank"]) for r in _results(source) if r["role"] == "worker"]
    return pd.concat(frames, ignore_index=True)


def in_time_order(source) -> pd.DataFrame:
    """All workers' steps in the order they happened, with `iteration`: minibatches so far / workers
    (the job's progress, comparable between sync and async whoever did the work)."""
    steps = worker_steps(source).sort_values("t", ignore_index=True)
    return steps.assign(iteration=(steps.index + 1) / steps["rank"].nunique())


def applied_updates(source) -> pd.DataFrame:
    """One row per push a server applied: server, t, worker, clock, version, version_staleness, clock_staleness."""
    frames = [pd.DataFrame(r["updates"]).assign(server=r["rank"]) for r in _results(source) if r["role"] == "server"]
    return pd.concat(frames, ignore_index=True)


def summary(runs: dict) -> pd.DataFrame:
    """Per run: wall time, final loss (mean of the last 10 iterations' minibatch losses), updates applied,
    the largest staleness, the mean time a pull waited."""
    rows = []
    for name, source in runs.items():
        steps, updates = in_time_order(source), applied_updates(source)
        rows.append({"run": name, "wall_s": steps["t"].max(),
                     "final_loss": steps[steps["iteration"] > steps["iteration"].max() - 10]["loss"].mean(),
                     "updates": len(updates), "max_clock_staleness": updates["clock_staleness"].max(),
                     "max_version_staleness": updates["version_staleness"].max(),
                     "mean_wait_ms": 1000 * steps["wait"].mean()})
    return pd.DataFrame(rows).set_index("run")


def loss_figure(runs: dict, smooth: int = 5, title: str = "Loss against iterations and against wall time") -> go.Figure:
    """Two panels: loss against iterations (minibatches / workers) and against wall time.

    The loss is the workers' minibatch loss, in time order, as a rolling mean over `smooth` iterations.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss vs iteration", "loss vs wall time"),
                        horizontal_spacing=0.1)
    for i, (name, source) in enumerate(runs.items()):
        steps = in_time_order(source)
        loss = steps["loss"].rolling(smooth * steps["rank"].nunique(), min_periods=1).mean()
        style = {"line": {"color": _colour(i)}, "legendgroup": name}
        fig.add_scatter(x=steps["iteration"], y=loss, name=name, row=1, col=1, **style)
        fig.add_scatter(x=steps["t"], y=loss, name=name, showlegend=False, row=1, col=2, **style)
    fig.update_xaxes(title_text="iteration (minibatches / workers)", row=1, col=1)
    fig.update_xaxes(title_text="wall time (s)", rangemode="tozero", row=1, col=2)
    fig.update_yaxes(title_text="training loss")
    fig.update_layout(title=title, height=420, legend_title_text="run")
    return fig


def staleness_histogram(runs: dict, measure: str = "version_staleness") -> go.Figure:
    """How stale the applied updates were: counts per value of `measure` ("version_staleness": server
    versions since the pull, or "clock_staleness": clocks ahead of the slowest worker at the read)."""
    if measure not in ("version_staleness", "clock_staleness"):
        raise ValueError(f"measure must be 'version_staleness' or 'clock_staleness', got {measure!r}")
    fig = go.Figure()
    for i, (name, source) in enumerate(runs.items()):
        counts = applied_updates(source)[measure].value_counts().sort_index()
        fig.add_bar(x=counts.index, y=counts, name=name, marker_color=_colour(i), opacity=0.75)
    axis = {"version_staleness": "staleness: server version at apply − version pulled",
            "clock_staleness": "staleness: clocks ahead of the slowest worker at the read"}[measure]
    fig.update_layout(title="Staleness of the applied updates", barmode="overlay", height=380,
                      xaxis_title=axis, yaxis_title="applied updates (log scale)", yaxis_type="log",
                      legend_title_text="run")
    return fig


def traffic_figure(source, title: str = "Bytes per link and load per server") -> go.Figure:
    """Left: bytes on each worker-server link, pushes and pulls apart. Right: each server's load."""
    servers = [r for r in _results(source) if r["role"] == "server"]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35], horizontal_spacing=0.12,
                        subplot_titles=("bytes per link", "server load"))
    for direction, key in (("worker → server (push)", "bytes_in"), ("server → worker (pull)", "bytes_out")):
        links = [(f"S{s['rank']}–W{w}", b) for s in servers for w, b in sorted(s[key].items())]
        fig.add_bar(x=[k for k, _ in links], y=[b / 1e3 for _, b in links], name=direction, row=1, col=1)
    names = [f"server {s['rank']}" for s in servers]
    load = [(sum(s["bytes_in"].values()) + sum(s["bytes_out"].values())) / 1e3 for s in servers]
    notes = [f"{s['messages']} msgs, busy {100 * s['busy_s'] / s['wall_s']:.0f}%" for s in servers]
    fig.add_bar(x=names, y=load, text=notes, textposition="auto", marker_color="grey", showlegend=False, row=1, col=2)
    fig.update_xaxes(title_text="link (server–worker rank)", row=1, col=1)
    fig.update_xaxes(title_text="server", row=1, col=2)
    fig.update_yaxes(title_text="kB", row=1, col=1)
    fig.update_yaxes(title_text="kB in + out", row=1, col=2)
    fig.update_layout(title=title, barmode="group", height=400, legend={"orientation": "h", "y": -0.25})
    return fig


def progress_figure(source, title: str = "Progress of each worker") -> go.Figure:
    """Each worker's step against wall time; a dashed line where a server declared a worker dead."""
    steps = worker_steps(source)
    fig = go.Figure()
    for i, (rank, rows) in enumerate(steps.groupby("rank")):
        fig.add_scatter(x=rows["t"], y=rows["step"], name=f"worker {rank}", mode="lines", line={"color": _colour(i)})
    for server in (r for r in _results(source) if r["role"] == "server"):
        for event in server["events"]:
            fig.add_vline(x=event["t"], line_dash="dash", line_color="red",
                          annotation_text=f"server {server['rank']}: worker {event['worker']} {event['event']}")
    fig.update_layout(title=title, xaxis_title="wall time (s)", yaxis_title="step", height=380)
    return fig


# ---------------------------------------------------------------- choosing an architecture (12)

MB = 1e6
METRICS = {  # column: (subplot title, scale)
    "wall_s": ("wall time (s)", 1),
    "bytes_total": ("bytes sent, all ranks (MB)", MB),
    "bytes_busiest": ("bytes sent, busiest rank (MB)", MB),
    "accuracy": ("final test accuracy", 1),
    "drift": ("drift: mean consensus distance", 1),
    "syncs": ("communication rounds per worker", 1),
}


def colour(architecture: str) -> str:
    """The same colour for an architecture in every figure."""
    return _colour(ARCHITECTURES.index(architecture) if architecture in ARCHITECTURES else len(ARCHITECTURES))


LABEL_POSITION = {"PS async": "bottom center"}  # keep neighbours' labels apart


def _accuracy_vs(table: pd.DataFrame, column: str, scale: float, x_title: str, title: str, log: bool) -> go.Figure:
    fig = go.Figure()
    for name, row in table.iterrows():
        fig.add_trace(go.Scatter(x=[row[column] / scale], y=[row["accuracy"]], name=name, mode="markers+text",
                                 text=[name], textposition=LABEL_POSITION.get(name, "top center"),
                                 marker={"size": 12, "color": colour(name)}))
    fig.update_layout(title=title, xaxis={"title": x_title, "type": "log" if log else "linear"},
                      yaxis={"title": "final test accuracy",  # room for the labels above and below the points
                             "range": [table["accuracy"].min() - 0.02, table["accuracy"].max() + 0.02]}, height=380)
    return fig


def accuracy_vs_bytes(table: pd.DataFrame) -> go.Figure:
    """Final accuracy against the bytes all ranks sent (log axis): up and to the left is better."""
    return _accuracy_vs(table, "bytes_total", MB, "bytes sent by all ranks (MB, log scale)",
                        "Final test accuracy vs bytes sent (same task, same examples processed)", log=True)


def accuracy_vs_wall_time(table: pd.DataFrame) -> go.Figure:
    """Final accuracy against the seconds each launch took on this machine."""
    return _accuracy_vs(table, "wall_s", 1, "wall time of the launch (s)",
                        "Final test accuracy vs wall time (this machine; timings are noisy)", log=False)


def metric_bars(table: pd.DataFrame, metrics=tuple(METRICS)) -> go.Figure:
    """One bar chart per metric, an architecture per bar; a missing bar is a metric that does not
    apply (drift of an architecture with a single model)."""
    cols = 3
    rows = math.ceil(len(metrics) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[METRICS[m][0] for m in metrics],
                        vertical_spacing=0.22, horizontal_spacing=0.07)
    names = list(table.index)
    for k, metric in enumerate(metrics):
        scale = METRICS[metric][1]
        values = [None if pd.isna(v) else v / scale for v in table[metric]]
        fig.add_trace(go.Bar(x=names, y=values, marker_color=[colour(n) for n in names], showlegend=False,
                             name=METRICS[metric][0]), row=k // cols + 1, col=k % cols + 1)
    fig.update_xaxes(tickangle=-35, title_text="architecture")
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(title="Each metric per architecture", height=330 * rows, margin={"t": 90})
    return fig


def bytes_by_rank(table: pd.DataFrame) -> go.Figure:
    """Bytes each rank sent: a server or aggregator (rank 0) stands out; peers are even."""
    fig = go.Figure()
    ranks = len(table["bytes_by_rank"].iloc[0])
    for r in range(ranks):
        fig.add_trace(go.Bar(x=list(table.index), y=[b[r] / MB for b in table["bytes_by_rank"]], name=f"rank {r}"))
    fig.update_layout(title="Bytes sent per rank (rank 0 is the server in PS and FedAvg)", barmode="group",
                      xaxis={"title": "architecture"}, yaxis={"title": "bytes sent (MB)"}, height=380)
    return fig


COST_MODELS = {  # one line per cost model, named with the architectures that follow it
    "ring all-reduce: 2(N−1)/N": "all-reduce",
    "gossip ring: 2 neighbours": "gossip ring",
    "full gossip, server, aggregator: N−1": "gossip full",
}


def scaling(table: pd.DataFrame, sizes=(4, 8, 16, 32, 64, 128, 256)) -> go.Figure:
    """The cost model: copies of the model the busiest rank sends per communication round as the
    cluster grows, with the measured rounds (bytes_busiest / syncs, message headers included) marked."""
    fig = go.Figure()
    for k, (label, architecture) in enumerate(COST_MODELS.items()):
        copies = [busiest_bytes_per_sync(architecture, n) / PAYLOAD for n in sizes]
        fig.add_trace(go.Scatter(x=list(sizes), y=copies, name=label, mode="lines",
                                 line={"color": "#888", "dash": ("solid", "dot", "dash")[k]}))
    n_measured = len(table["bytes_by_rank"].iloc[0])
    for name, row in table.iterrows():
        fig.add_trace(go.Scatter(x=[n_measured], y=[row["bytes_busiest"] / row["syncs"] / PAYLOAD], mode="markers",
                                 marker={"color": colour(name), "size": 10}, name=f"measured: {name}"))
    fig.update_layout(title="Busiest rank: model copies sent per communication round vs ranks (lines: cost model)",
                      xaxis={"title": "ranks N (log scale)", "type": "log"},
                      yaxis={"title": "model copies per round (log scale)", "type": "log"}, height=420)
    return fig
