"""Figures for federated learning (notebooks 05 and 05b): who holds which labels, accuracy per round,
the α / C / E knob over simulated runs, accuracy under attack, what the server sees under secure
aggregation, accuracy against ε."""

from __future__ import annotations

from itertools import product

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from distlab.architectures.federated import partition
from distlab.architectures.federated.partition import Federation
from distlab.architectures.federated.simulation import Config, FederatedRun, simulate


def simulate_all(runs: dict, engine: str = "vectorized") -> dict:
    """Simulate each named (federation, config) with one progress bar over all their rounds: {name: FederatedRun}."""
    bar = tqdm(total=sum(config.rounds for _, config in runs.values()), desc="federated rounds")
    out = {}
    for name, (fed, config) in runs.items():
        bar.set_postfix_str(str(name))
        out[name] = simulate(fed, config, engine, on_round=lambda row: bar.update())
    bar.close()
    return out


def server_history(run, attempt: int | None = None) -> FederatedRun:
    """A dl.launch run of train_federated as a FederatedRun: the server's model and its rows per round
    (of one attempt, for a run restarted after its server died)."""
    rows = run.metrics[run.metrics["rank"] == 0].dropna(subset=["accuracy"])
    if attempt is not None:
        rows = rows[rows["attempt"] == attempt]
    return FederatedRun(run.results[0], [{**row, "round": int(row["step"])} for row in rows.to_dict("records")])


def history(runs: dict[str, FederatedRun]) -> pd.DataFrame:
    """One row per run and round."""
    return pd.DataFrame([{"run": name, **row} for name, run in runs.items() for row in run.history])


def label_distribution(feds: dict[str, Federation], title: str = "labels held by each client") -> go.Figure:
    """One panel per partition: stacked bars of each client's examples by label."""
    fig = make_subplots(rows=1, cols=len(feds), subplot_titles=list(feds), shared_yaxes=True)
    for col, fed in enumerate(feds.values(), start=1):
        counts = fed.label_counts()
        for label in range(fed.num_classes):
            fig.add_bar(x=list(range(fed.num_clients)), y=counts[:, label].tolist(), name=f"label {label}",
                        legendgroup=str(label), showlegend=col == 1, row=1, col=col,
                        marker_color=qualitative.Plotly[label % 10])
        fig.update_xaxes(title_text="client", row=1, col=col)
    fig.update_layout(barmode="stack", title=title, height=360)
    fig.update_yaxes(title_text="examples", row=1, col=1)
    return fig


def accuracy_figure(runs: dict[str, FederatedRun], title: str = "test accuracy of the global model",
                    metric: str = "accuracy", target: float | None = None) -> go.Figure:
    """One line per run: `metric` after each round (optionally a dotted target line)."""
    fig = go.Figure()
    for i, (name, run) in enumerate(runs.items()):
        fig.add_scatter(x=[r["round"] for r in run.history], y=[r[metric] for r in run.history], name=name,
                        line={"color": qualitative.Plotly[i % 10]})
    if target is not None:
        fig.add_hline(y=target, line_dash="dot", annotation_text=f"{target:.0%}")
    fig.update_layout(title=title, xaxis_title="round", yaxis_title=metric.replace("_", " "), height=380)
    return fig


IID = "IID"  # the reference the knob draws every chosen setting against


def knob_grid(alphas=(0.1, 0.5, 10.0), fractions=(0.3, 1.0), epochs=(1, 5), num_clients: int = 10,
              rounds: int = 15, batch_size: int = 10, lr: float = 0.1) -> dict[tuple, FederatedRun]:
    """Real simulated runs for every (α, C, E) of the grid, α = "IID" included: {(α, C, E): FederatedRun}.
    The knob only picks among them, so turning it costs nothing."""
    feds = {a: partition.digits(num_clients, "dirichlet", alpha=a) for a in alphas}
    feds[IID] = partition.digits(num_clients, "iid")
    grid = {(a, c, e): (fed, Config(rounds=rounds, fraction=c, epochs=e, batch_size=batch_size, lr=lr))
            for (a, fed), c, e in product(feds.items(), fractions, epochs)}
    return simulate_all(grid)


def _levels(grid: dict[tuple, FederatedRun], i: int) -> list:
    return list(dict.fromkeys(key[i] for key in grid))


def federated_knob(grid: dict[tuple, FederatedRun]) -> widgets.VBox:
    """Dropdowns for Dirichlet α, client fraction C and local epochs E over knob_grid's runs: the chosen
    setting's accuracy per round against IID at the same C and E, the final accuracies in the title."""
    alpha = widgets.Dropdown(options=[a for a in _levels(grid, 0) if a != IID], description="α")
    fraction = widgets.Dropdown(options=_levels(grid, 1), description="C")
    epochs = widgets.Dropdown(options=_levels(grid, 2), description="E")
    fig = go.FigureWidget()
    for i, (name, dash) in enumerate((("chosen", "solid"), (IID, "dot"))):
        fig.add_scatter(name=name, mode="lines+markers", line={"color": qualitative.Plotly[i], "dash": dash})
    fig.update_layout(xaxis_title="round", yaxis_title="test accuracy", yaxis_range=[0, 1], height=380)

    def redraw(_=None) -> None:
        chosen, iid = grid[alpha.value, fraction.value, epochs.value], grid[IID, fraction.value, epochs.value]
        with fig.batch_update():
            for trace, run, name in zip(fig.data, (chosen, iid), (f"Dirichlet α={alpha.value:g}", IID)):
                trace.x, trace.y = [r["round"] for r in run.history], [r["accuracy"] for r in run.history]
                trace.name = name
            fig.layout.title = (f"α={alpha.value:g}, C={fraction.value:g}, E={epochs.value}: final accuracy "
                                f"{chosen.accuracy:.3f} (IID {iid.accuracy:.3f})")

    for control in (alpha, fraction, epochs):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([alpha, fraction, epochs]), fig])


def robustness_figure(table: pd.DataFrame, title: str = "accuracy under attack") -> go.Figure:
    """table: columns attack, attackers (share), rule, accuracy. One panel per attack, one line per rule."""
    attacks = list(dict.fromkeys(table["attack"]))
    fig = make_subplots(rows=1, cols=len(attacks), subplot_titles=[a.replace("_", " ") for a in attacks],
                        shared_yaxes=True)
    rules = list(dict.fromkeys(table["rule"]))
    for col, attack in enumerate(attacks, start=1):
        for i, rule in enumerate(rules):
            rows = table[(table["attack"] == attack) & (table["rule"] == rule)].sort_values("attackers")
            fig.add_scatter(x=100 * rows["attackers"], y=rows["accuracy"], name=rule, legendgroup=rule,
                            showlegend=col == 1, mode="lines+markers", line={"color": qualitative.Plotly[i % 10]},
                            row=1, col=col)
        fig.update_xaxes(title_text="% malicious clients", row=1, col=col)
    fig.update_yaxes(title_text="test accuracy", range=[0, 1], row=1, col=1)
    fig.update_layout(title=title, height=380)
    return fig


def masks_figure(true: torch.Tensor, masked: torch.Tensor,
                 title: str = "one client's update: true vs what the server holds") -> go.Figure:
    """Histograms of a client's true update values and of its masked version."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["true update (never leaves the client)",
                                                        "masked update (what the server holds)"])
    fig.add_histogram(x=true.flatten().tolist(), nbinsx=40, name="true", row=1, col=1)
    fig.add_histogram(x=masked.flatten().tolist(), nbinsx=40, name="masked", row=1, col=2)
    fig.update_xaxes(title_text="value", row=1, col=1)
    fig.update_xaxes(title_text="value", row=1, col=2)
    fig.update_yaxes(title_text="coordinates", row=1, col=1)
    fig.update_layout(title=title, height=340, showlegend=False)
    return fig


def privacy_figure(table: pd.DataFrame, title: str = "privacy against accuracy") -> go.Figure:
    """table: columns noise_multiplier, epsilon, accuracy: accuracy against ε (log scale)."""
    fig = go.Figure(go.Scatter(x=table["epsilon"], y=table["accuracy"], mode="lines+markers+text",
                               text=[f"σ={s:g}" for s in table["noise_multiplier"]], textposition="top center"))
    fig.update_layout(title=title, xaxis_title="ε (δ = 1e-5; smaller is more private)", xaxis_type="log",
                      yaxis_title="test accuracy", height=380)
    return fig
