"""The scaling figure: each step's compute and all-reduce time per N, speedup against ideal and Amdahl's law,
and efficiency, for strong scaling (fixed total batch) and weak scaling (fixed batch per rank)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..parallel.scaling import amdahl, fit_serial_fraction


def scaling_figure(strong: list[dict], weak: list[dict]) -> go.Figure:
    """`strong`, `weak`: rows of scaling.speedups (N = 1 baseline included). Weak efficiency is T(1)/T(N)."""
    serial = fit_serial_fraction([r["world_size"] for r in strong], [r["speedup"] for r in strong])
    ns = sorted({r["world_size"] for r in strong + weak})
    grid = [1 + i * (max(ns) - 1) / 50 for i in range(51)]
    fig = make_subplots(rows=1, cols=3, subplot_titles=["time per step (slowest rank)", "strong scaling: speedup",
                                                        "efficiency"])
    for kind, rows, offset in (("strong", strong, -0.18), ("weak", weak, 0.18)):
        for part, colour in (("compute", "#4C78A8" if kind == "strong" else "#72B7B2"),
                             ("comm", "#E45756" if kind == "strong" else "#F58518")):
            fig.add_trace(go.Bar(x=[r["world_size"] + offset for r in rows], y=[r[part] * 1e3 for r in rows],
                                 width=0.34, name=f"{kind}: {'all-reduce' if part == 'comm' else part}",
                                 marker_color=colour, offsetgroup=kind,
                                 base=[r["compute"] * 1e3 for r in rows] if part == "comm" else None), 1, 1)
    fig.add_trace(go.Scatter(x=ns, y=ns, mode="lines", line={"dash": "dot", "color": "grey"},
                             name="ideal: speedup = N"), 1, 2)
    fig.add_trace(go.Scatter(x=grid, y=[amdahl(serial, n) for n in grid], mode="lines", line={"color": "#4C78A8"},
                             name=f"Amdahl, fitted s = {serial:.2f}"), 1, 2)
    fig.add_trace(go.Scatter(x=[r["world_size"] for r in strong], y=[r["speedup"] for r in strong],
                             mode="markers", marker={"size": 11, "color": "#4C78A8"}, name="strong: measured"), 1, 2)
    for kind, rows, colour in (("strong", strong, "#4C78A8"), ("weak", weak, "#72B7B2")):
        fig.add_trace(go.Scatter(x=[r["world_size"] for r in rows], y=[r["efficiency"] for r in rows],
                                 mode="lines+markers", marker={"size": 10, "color": colour},
                                 name=f"{kind}: efficiency"), 1, 3)
    fig.update_xaxes(title_text="ranks N (1 thread each)", tickvals=ns)
    fig.update_yaxes(title_text="milliseconds per step", row=1, col=1)
    fig.update_yaxes(title_text="speedup T(1) / T(N)", row=1, col=2)
    fig.update_yaxes(title_text="efficiency (1 = ideal)", range=[0, 1.2], row=1, col=3)
    fig.update_layout(title="Strong and weak scaling on this machine's cores: compute vs all-reduce, Amdahl",
                      barmode="overlay", height=430)
    return fig
