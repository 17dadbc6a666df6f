"""Figures for notebook 05b's privacy half: what the server holds under secure aggregation, and the DP
knob (noise multiplier σ against ε from the accountant and accuracy from real runs)."""

from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from distlab.architectures.federated.privacy import epsilon


def masked_update_figure(true: torch.Tensor, masked: torch.Tensor, modulus: int,
                         title: str = "one client's update: true vs what the server holds") -> go.Figure:
    """Histograms of a client's true update values and of its masked version (integers mod R, shown as a share of R)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["true update (never leaves the client)",
                                                        "masked update mod R (what the server holds)"])
    fig.add_histogram(x=true.flatten().tolist(), nbinsx=40, name="true", row=1, col=1)
    fig.add_histogram(x=(masked.flatten().double() / modulus).tolist(), xbins={"start": 0, "end": 1, "size": 0.05},
                      name="masked", row=1, col=2)
    fig.update_xaxes(title_text="value", row=1, col=1)
    fig.update_xaxes(title_text="masked value / R", range=[0, 1], row=1, col=2)
    fig.update_yaxes(title_text="coordinates", row=1, col=1)
    fig.update_layout(title=title, height=340, showlegend=False)
    return fig


def privacy_knob(accuracy: dict[float, float], rate: float, rounds: int, delta: float = 1e-5,
                 value: float | None = None) -> widgets.VBox:
    """A σ slider over the noise multipliers of `accuracy` ({σ: test accuracy of a real run}); the figure
    draws ε (opacus's RDP accountant at this sampling rate, rounds and δ) and accuracy against σ, and
    marks the chosen σ on both. Moving the slider only moves the marks: nothing is recomputed but ε."""
    sigmas = sorted(accuracy)
    eps = [epsilon(s, rate, rounds, delta) for s in sigmas]
    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"privacy: ε after {rounds} rounds (δ = {delta:g})",
                                                        "utility: test accuracy after training"])
    fig.add_scatter(x=sigmas, y=eps, mode="lines+markers", name="ε", row=1, col=1)
    fig.add_scatter(x=sigmas, y=[accuracy[s] for s in sigmas], mode="lines+markers", name="accuracy", row=1, col=2)
    for col in (1, 2):
        fig.add_scatter(x=[None], y=[None], mode="markers", name="chosen σ", showlegend=col == 1, row=1, col=col,
                        marker={"size": 16, "symbol": "circle-open", "line": {"width": 3}, "color": "crimson"})
        fig.update_xaxes(title_text="noise multiplier σ", type="log", row=1, col=col)
    fig.update_yaxes(title_text="ε (smaller is more private)", type="log", row=1, col=1)
    fig.update_yaxes(title_text="test accuracy", row=1, col=2)
    fig.update_layout(title=f"DP-FedAvg, clients sampled with probability q = {rate:g} per round", height=400)
    widget = go.FigureWidget(fig)
    slider = widgets.SelectionSlider(options=[(f"{s:g}", s) for s in sigmas], description="σ",
                                     value=sigmas[len(sigmas) // 2] if value is None else value)
    readout = widgets.HTML()

    def mark(sigma: float) -> None:
        chosen_eps = epsilon(sigma, rate, rounds, delta)
        with widget.batch_update():
            widget.data[2].x, widget.data[2].y = [sigma], [chosen_eps]
            widget.data[3].x, widget.data[3].y = [sigma], [accuracy[sigma]]
        readout.value = (f"σ = {sigma:g}: ε = <b>{chosen_eps:.2f}</b> (δ = {delta:g}), "
                         f"test accuracy <b>{accuracy[sigma]:.3f}</b>")

    slider.observe(lambda change: mark(change["new"]), names="value")
    mark(slider.value)
    return widgets.VBox([widgets.HBox([slider, readout]), widget])
