"""The training dashboard as a plotly figure: loss per rank, gradient norm per layer, replica drift,
bytes communicated per step. The live dashboard redraws this same figure while ranks run."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

PANELS = {
    "loss": (1, 1, "loss per rank", "loss"),
    "grad": (1, 2, "gradient norm per layer (rank 0)", "‖grad‖"),
    "drift": (2, 1, "drift from the replicas' mean", "L2 distance"),
    "bytes": (2, 2, "bytes sent per step", "bytes"),
}
HINTS = {
    "loss": "ctx.log(step=..., loss=...) draws here",
    "grad": "ctx.watch(model) records gradient norms",
    "drift": "ctx.watch(model, drift_every=k) records drift",
    "bytes": "ctx.comm / a watched DDP model counts bytes",
}


def _metrics(source) -> pd.DataFrame:
    return source if isinstance(source, pd.DataFrame) else source.metrics


def _colour(i: int) -> str:
    return qualitative.Plotly[i % len(qualitative.Plotly)]


def _x(rows: pd.DataFrame):
    return rows["step"] if "step" in rows else list(range(len(rows)))


def training_traces(metrics: pd.DataFrame) -> dict[str, list[go.Scatter]]:
    """The traces of each panel (panel name -> traces), from a run's metrics DataFrame."""
    traces: dict[str, list[go.Scatter]] = {name: [] for name in PANELS}
    if metrics.empty:
        return traces
    for rank, rows in metrics.groupby("rank"):
        style = {"legendgroup": f"rank {rank}", "line": {"color": _colour(rank)}}
        if "loss" in rows:
            loss = rows.dropna(subset=["loss"])
            traces["loss"].append(go.Scatter(x=_x(loss), y=loss["loss"], name=f"rank {rank}", **style))
        if "drift" in rows:
            drift = rows.dropna(subset=["drift"])
            at = drift["drift_step"] if "drift_step" in drift else _x(drift)  # the step it was measured at
            traces["drift"].append(go.Scatter(x=at, y=drift["drift"], name=f"rank {rank}",
                                              mode="lines+markers", showlegend=False, **style))
        if "comm_bytes" in rows and rows["comm_bytes"].any():
            traces["bytes"].append(go.Scatter(x=_x(rows), y=rows["comm_bytes"], name=f"rank {rank}",
                                              showlegend=False, **style))
    first = metrics[metrics["rank"] == metrics["rank"].min()]
    for i, column in enumerate(c for c in metrics.columns if c.startswith("grad/")):
        rows = first.dropna(subset=[column])
        traces["grad"].append(go.Scatter(x=_x(rows), y=rows[column], name=f"layer {column[5:]}",
                                         legendgroup="layers", line={"dash": "dot", "color": _colour(i + 5)}))
    if "overhead_bytes" in first and first["overhead_bytes"].any():
        paid = first[first["overhead_bytes"] > 0]
        at = paid["drift_step"] if "drift_step" in paid else _x(paid)
        traces["bytes"].append(go.Scatter(x=at, y=paid["overhead_bytes"], name="telemetry overhead (rank 0)",
                                          mode="markers", marker={"color": "grey", "symbol": "x"}))
    return traces


def training_figure(source) -> go.Figure:
    """The dashboard figure of a Run, a loaded run, or a metrics DataFrame."""
    traces = training_traces(_metrics(source))
    fig = make_subplots(rows=2, cols=2, subplot_titles=[p[2] for p in PANELS.values()],
                        horizontal_spacing=0.1, vertical_spacing=0.16)
    for name, (row, col, _, ylabel) in PANELS.items():
        for trace in traces[name]:
            fig.add_trace(trace, row=row, col=col)
        fig.update_yaxes(title_text=ylabel, row=row, col=col, rangemode="tozero" if name != "loss" else "normal")
        fig.update_xaxes(title_text="step", row=row, col=col)
        if not traces[name]:  # paper coordinates: a FigureWidget misplaces "x2 domain" references
            axis = _axis(row, col)
            x_domain, y_domain = fig.layout[f"xaxis{axis}"].domain, fig.layout[f"yaxis{axis}"].domain
            fig.add_annotation(text=HINTS[name], showarrow=False, font={"color": "grey"}, xref="paper",
                               yref="paper", x=sum(x_domain) / 2, y=sum(y_domain) / 2, xanchor="center",
                               yanchor="middle")
    fig.update_layout(height=640, margin={"t": 40, "b": 40, "r": 20},
                      legend={"orientation": "h", "y": -0.14, "groupclick": "toggleitem"})
    return fig


def _axis(row: int, col: int) -> str:
    index = (row - 1) * 2 + col
    return "" if index == 1 else str(index)
