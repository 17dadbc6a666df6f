"""Figures for pipeline and tensor parallelism: the Gantt chart of a schedule, the bubble measured beside
(p-1)/(m+p-1), activation memory per stage, bytes per mesh axis, and the latency-throughput trade-off."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

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
