"""Figures for notebook 14: which rank computes which block of causal attention, work and time per rank,
bytes beside their formulas, tokens per expert over training, tokens dropped by capacity, and a capacity
factor knob that re-routes a batch through the library's router."""

from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..parallel import context_parallel as cp
from ..parallel import experts as ex


def causal_blocks(world_size: int, layout: str) -> go.Figure:
    """The causal score matrix cut into chunks: each visible block coloured by the rank that computes it."""
    n_chunks = 2 * world_size
    owner = {c: r for r in range(world_size) for c in cp.chunks_of(r, world_size, layout)}
    z = [[owner[q] if k <= q else None for k in range(n_chunks)] for q in range(n_chunks)]
    work = [sum(q + 1 for q in cp.chunks_of(r, world_size, layout)) for r in range(world_size)]
    colours = [[i / max(world_size - 1, 1), qualitative.Plotly[i]] for i in range(world_size)]
    fig = go.Figure(go.Heatmap(z=z, x=[f"k{c}" for c in range(n_chunks)], y=[f"q{c}" for c in range(n_chunks)],
                               colorscale=colours, zmin=0, zmax=world_size - 1, xgap=2, ygap=2,
                               colorbar=dict(title="rank", tickvals=list(range(world_size))),
                               hovertemplate="query chunk %{y}, key chunk %{x}: rank %{z}<extra></extra>"))
    fig.update_layout(title=f"{layout} split, {world_size} ranks: blocks per rank {work}", height=380,
                      xaxis_title="key chunk (position order)", yaxis_title="query chunk (position order)",
                      yaxis=dict(autorange="reversed"))
    return fig


def per_rank(values: dict[str, list[float]], title: str, axis: str) -> go.Figure:
    """Grouped bars: one group per rank, one bar per setting (e.g. contiguous vs zig-zag)."""
    fig = go.Figure()
    for i, (name, per) in enumerate(values.items()):
        fig.add_bar(x=[f"rank {r}" for r in range(len(per))], y=per, name=name, marker_color=qualitative.Plotly[i])
    fig.update_layout(title=title, xaxis_title="rank", yaxis_title=axis, barmode="group")
    return fig


def bytes_against_formula(rows: list[dict], title: str = "bytes sent per rank per step: measured vs formula"
                          ) -> go.Figure:
    """rows: dicts with label, measured, predicted (bytes): measured bars, the formula as a marker on each."""
    fig = go.Figure()
    labels = [r["label"] for r in rows]
    fig.add_bar(x=labels, y=[r["measured"] / 1024 for r in rows], name="measured", marker_color=qualitative.Plotly[0])
    fig.add_scatter(x=labels, y=[r["predicted"] / 1024 for r in rows], name="formula", mode="markers",
                    marker=dict(symbol="line-ew-open", size=40, line=dict(width=3, color="black")))
    fig.update_layout(title=title, xaxis_title="method, ranks", yaxis_title="KiB sent per rank (forward + backward)")
    return fig


def expert_load(loads: dict[str, list[list[int]]], title: str = "tokens per expert over training") -> go.Figure:
    """loads: setting -> per step, the assignments each expert received; one panel per setting."""
    fig = make_subplots(rows=1, cols=len(loads), subplot_titles=list(loads), shared_yaxes=True)
    for col, per_step in enumerate(loads.values(), start=1):
        for e in range(len(per_step[0])):
            fig.add_scatter(y=[step[e] for step in per_step], mode="lines", name=f"expert {e}", row=1, col=col,
                            line=dict(color=qualitative.Plotly[e]), showlegend=col == 1, legendgroup=str(e))
        fig.update_xaxes(title_text="training step", row=1, col=col)
    fig.update_yaxes(title_text="tokens routed to the expert", row=1, col=1)
    fig.update_layout(title=title, height=380)
    return fig


def dropped(curves: dict[str, dict[float, float]], title: str = "tokens dropped by the capacity cut") -> go.Figure:
    """curves: setting -> {capacity factor: fraction of assignments dropped}."""
    fig = go.Figure()
    for i, (name, by_factor) in enumerate(curves.items()):
        fig.add_scatter(x=list(by_factor), y=[100 * v for v in by_factor.values()], name=name, mode="lines+markers",
                        line=dict(color=qualitative.Plotly[i]))
    fig.update_layout(title=title, xaxis_title="capacity factor", yaxis_title="assignments dropped (%)",
                      yaxis=dict(rangemode="tozero"))
    return fig


def capacity_explorer(router: torch.nn.Linear, tokens: torch.Tensor, top_k: int = 1,
                      world_size: int = 4) -> widgets.VBox:
    """A capacity-factor slider: the batch re-routed by `ex.route`, kept and dropped tokens per expert, and
    the bytes of one all-to-all on `world_size` ranks from `ex.predicted_all_to_all_bytes`."""
    n_experts = router.out_features
    fig = go.FigureWidget()
    fig.add_bar(name="kept", marker_color=qualitative.Plotly[2])
    fig.add_bar(name="dropped", marker_color=qualitative.Plotly[1])
    fig.update_layout(barmode="stack", xaxis_title="expert", yaxis_title="assignments", height=360)
    slider = widgets.FloatSlider(value=1.0, min=0.25, max=3.0, step=0.25, description="capacity factor",
                                 style={"description_width": "110px"})

    def redraw(_=None) -> None:
        with torch.no_grad():
            routing = ex.route(router, tokens, top_k, slider.value)
        choices, kept = routing.choices.reshape(-1), routing.slots.reshape(-1) >= 0
        with fig.batch_update():
            fig.data[0].x = fig.data[1].x = [f"expert {e}" for e in range(n_experts)]
            fig.data[0].y = torch.bincount(choices[kept], minlength=n_experts).tolist()
            fig.data[1].y = torch.bincount(choices[~kept], minlength=n_experts).tolist()
            group = tokens.size(0) // world_size  # each rank routes its share with its own capacity
            per = ex.predicted_all_to_all_bytes(world_size, n_experts,
                                                ex.capacity(group, n_experts, top_k, slider.value), tokens.size(-1))
            fig.layout.title = (f"capacity {routing.capacity} slots per expert: {routing.dropped()} of "
                                f"{kept.numel()} dropped; one all-to-all on {world_size} ranks ≈ {per / 1024:.0f} KiB "
                                "per rank")

    slider.observe(redraw, names="value")
    redraw()
    return widgets.VBox([slider, fig])
