"""Figures of notebook 12 (choosing an architecture): one point or bar per architecture, from compare()."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..compare import ARCHITECTURES, PAYLOAD, busiest_bytes_per_sync
from .figures import _colour

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
                                 text=[name], textposition=LABEL_POSITION.get(name, "top center"), marker={"size": 12, "color": colour(name)}))
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
