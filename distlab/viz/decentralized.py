"""Figures of decentralized gossip (notebook 04): the graphs, how fast they average, drift, accuracy per byte."""

from __future__ import annotations

import functools
import time

import ipywidgets as widgets
import networkx as nx
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..architectures import topology as topo
from .figures import _colour


def _layout(topology: str, graph: list, seed: int) -> dict[int, tuple[float, float]]:
    if topology == "torus":
        _, cols = topo.torus_shape(len(graph))
        return {i: (i % cols, -(i // cols)) for i in range(len(graph))}
    g = nx.Graph([(i, j) for i, nb in enumerate(graph) for j in nb])
    g.add_nodes_from(range(len(graph)))
    return nx.spring_layout(g, seed=seed) if topology == "random" else nx.circular_layout(sorted(g.nodes))


def graph_traces(topology: str, n: int, seed: int = 0) -> list[go.Scatter]:
    """Edges (grey lines) and nodes (numbered markers) of one topology."""
    graph = topo.graph(topology, n, seed=seed)
    pos = _layout(topology, graph, seed)
    xs, ys = [], []
    for i, neighbours in enumerate(graph):
        for j in (j for j in neighbours if j > i):
            xs += [pos[i][0], pos[j][0], None]
            ys += [pos[i][1], pos[j][1], None]
    nodes = go.Scatter(x=[pos[i][0] for i in range(n)], y=[pos[i][1] for i in range(n)], mode="markers+text",
                       text=[str(i) for i in range(n)], textfont={"color": "white", "size": 9},
                       marker={"size": 16, "color": "#636efa"}, hovertext=[f"node {i}: {len(graph[i])} neighbours"
                                                                        for i in range(n)], hoverinfo="text")
    return [go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#bbb", "width": 1}, hoverinfo="skip"), nodes]


def topologies_figure(n: int = 16, topologies=topo.TOPOLOGIES, seed: int = 0) -> go.Figure:
    """Each topology on n nodes, titled with its degree and spectral gap (in-process: the matrix alone)."""
    titles = []
    for t in topologies:
        graph = topo.graph(t, n, seed=seed)
        degrees = sorted({len(nb) for nb in graph})
        degree = degrees[0] if len(degrees) == 1 else f"{degrees[0]}-{degrees[-1]}"
        titles.append(f"{t}: degree {degree}, gap {topo.spectral_gap(topo.mixing_matrix(graph)):.2f}")
    fig = make_subplots(rows=1, cols=len(topologies), subplot_titles=titles, horizontal_spacing=0.02)
    for k, t in enumerate(topologies):
        for trace in graph_traces(t, n, seed):
            fig.add_trace(trace, row=1, col=k + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_annotations(font_size=11)
    fig.update_layout(title=f"Topologies on {n} nodes (in-process, from the graph alone); gap = 1 − |λ₂(W)|",
                      showlegend=False, height=300, margin={"t": 80, "b": 10, "l": 10, "r": 10})
    return fig


def spectral_gap_figure(sizes=(4, 8, 16, 32, 64, 128), topologies=topo.TOPOLOGIES, seed: int = 0) -> go.Figure:
    """Spectral gap of each topology's mixing matrix as the graph grows (in-process)."""
    fig = go.Figure()
    for k, t in enumerate(topologies):
        gaps = [topo.spectral_gap(topo.mixing_matrix(topo.graph(t, n, seed=seed))) for n in sizes]
        fig.add_trace(go.Scatter(x=list(sizes), y=gaps, name=t, mode="lines+markers", line={"color": _colour(k)}))
    fig.update_layout(title="Spectral gap 1 − |λ₂(W)| vs number of nodes (in-process, mixing matrix alone)",
                      xaxis={"title": "nodes N", "type": "log"},
                      yaxis={"title": "spectral gap (1 = one-step consensus)"},
                      height=360)
    return fig


KNOB_SIZES = tuple(2 ** k for k in range(2, 11))  # 4 ... 1024 nodes


@functools.cache
def gap_of(topology: str, n: int, seed: int = 0) -> float:
    """Spectral gap of the topology's mixing matrix on n nodes (cached: a knob asks again and again)."""
    return topo.spectral_gap(topo.mixing_matrix(topo.graph(topology, n, seed=seed)))


def measured_decay(run) -> pd.Series:
    """Ξ(t) / Ξ(0) of a pure-averaging run on real ranks (lr = 0), by step."""
    xi = _consensus(run)
    return xi / xi.iloc[0]


def consensus_knob(measured: dict, steps: int = 30, sizes=KNOB_SIZES, seed: int = 0) -> widgets.VBox:
    """A topology dropdown and an N slider over the predicted disagreement decay Ξ(t)/Ξ(0) = (1 − gap)^t, the gap
    computed from that graph's mixing matrix. `measured`: {topology: pure-averaging run on real ranks}; where the
    chosen graph is the graph of a measured run (same N, same edges) its measured decay is drawn beside."""
    measured_n = {run.world_size for run in measured.values()}
    topology = widgets.Dropdown(options=list(topo.TOPOLOGIES), value="ring", description="topology")
    size = widgets.SelectionSlider(options=sorted({*sizes, *measured_n}), value=min(measured_n, default=sizes[0]),
                                   description="N (nodes)", continuous_update=False)
    t = list(range(steps + 1))
    fig = go.FigureWidget()
    fig.add_scatter(x=t, y=[1.0] * len(t), mode="lines", name="predicted (1 − gap)^t", line={"color": _colour(0)})
    fig.add_scatter(x=[], y=[], mode="markers", name="measured on real ranks", marker={"color": _colour(1), "size": 8})
    fig.update_layout(xaxis_title="gossip step t", height=380,
                      yaxis={"title": "disagreement Ξ(t) / Ξ(0)", "type": "log", "exponentformat": "power",
                             "range": [-12, 0.2]})

    def redraw(_=None) -> None:
        name, n = topology.value, size.value
        gap = gap_of(name, n, seed)
        graph = topo.graph(name, n, seed=seed)
        twin = next((m for m, run in measured.items()
                     if run.world_size == n and topo.graph(m, n, seed=seed) == graph), None)
        decay = measured_decay(measured[twin]) if twin else pd.Series(dtype=float)
        with fig.batch_update():
            fig.data[0].y = [max((1 - gap) ** k, 1e-300) for k in t]  # the complete graph: 0 after one step
            fig.data[1].x, fig.data[1].y = decay.index.tolist(), decay.tolist()
            fig.data[1].name = f"measured: pure averaging, {twin} of {n} real ranks" if twin else "measured (N/A)"
            fig.layout.title = (f"{name} on {n} nodes: gap 1 − |λ₂(W)| = {gap:.4f}, predicted Ξ(t)/Ξ(0) = "
                                f"{1 - gap:.4f}^t (from the mixing matrix)" + ("" if twin else
                                "<br>no run of this graph in the notebook: the prediction alone"))

    topology.observe(redraw, names="value")
    size.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([topology, size]), fig])


def _consensus(run) -> pd.Series:
    rows = run.metrics.dropna(subset=["consensus"])
    xi = rows.groupby("step")["consensus"].mean()  # every living rank logs the same value
    return xi[xi > 0]  # identical starts (Ξ = 0) have no place on a log scale


def consensus_figure(runs: dict, title: str, predicted: dict[str, float] | None = None,
                     mark_step: int | None = None) -> go.Figure:
    """Consensus distance per step of each run (real ranks), log scale; dashed: Ξ(0)·slem^t if given."""
    fig = go.Figure()
    for k, (name, run) in enumerate(runs.items()):
        xi = _consensus(run)
        fig.add_trace(go.Scatter(x=xi.index, y=xi.values, name=name, mode="lines+markers", marker={"size": 4},
                                 line={"color": _colour(k)}))
        if predicted and name in predicted:
            at = xi.index.to_series()
            fig.add_trace(go.Scatter(x=at, y=xi.iloc[0] * predicted[name] ** at,
                                     name=f"{name}: Ξ(0)·{predicted[name]:.3f}^t",
                                     mode="lines", line={"color": _colour(k), "dash": "dash"}))
    if mark_step is not None:
        fig.add_vline(x=mark_step, line_dash="dot", annotation_text="a node leaves")
    fig.update_layout(title=title, xaxis_title="step", yaxis={"title": "consensus distance Ξ", "type": "log",
                                                              "exponentformat": "power"}, height=380)
    return fig


def simulated_drift_figure(n: int = 16, steps: int = 200, lr: float = 0.1, topologies=topo.TOPOLOGIES,
                           seed: int = 0) -> go.Figure:
    """Drift under gradient noise, x <- W(x - lr·noise), for each topology on n nodes (in-process)."""
    fig = go.Figure()
    for k, t in enumerate(topologies):
        w = topo.mixing_matrix(topo.graph(t, n, seed=seed))
        fig.add_trace(go.Scatter(y=topo.simulate_gossip(w, steps, lr=lr, seed=seed), name=t,
                                 line={"color": _colour(k)}))
    fig.update_layout(title=f"Drift per topology on {n} nodes (in-process: the mixing matrix and random 'gradients')",
                      xaxis_title="step", yaxis_title="consensus distance Ξ", height=360)
    return fig


def accuracy_vs_bytes(run) -> pd.DataFrame:
    """Mean test accuracy over ranks against the mean cumulative bytes each rank has sent, per evaluation."""
    m = run.metrics.dropna(subset=["step"]).sort_values(["rank", "step"]).copy()
    m["bytes"] = m.groupby("rank")["sent_bytes"].cumsum()
    evaluated = m.dropna(subset=["accuracy"])
    return evaluated.groupby("step")[["bytes", "accuracy"]].mean()


def accuracy_vs_bytes_figure(runs: dict) -> go.Figure:
    fig = go.Figure()
    for k, (name, run) in enumerate(runs.items()):
        curve = accuracy_vs_bytes(run)
        fig.add_trace(go.Scatter(x=curve["bytes"] / 1e6, y=curve["accuracy"], name=name, mode="lines+markers",
                                 line={"color": _colour(k)}))
    fig.update_layout(title="Test accuracy vs bytes sent per rank (4 real ranks, same task and steps)",
                      xaxis_title="MB sent per rank (gossip: counted; all-reduce: ring 2(N−1)/N·S per step)",
                      yaxis_title="test accuracy (mean over ranks)", height=380)
    return fig


def hybrid_traffic_figure(run) -> go.Figure:
    """Bytes each rank sent, split into control messages and parameters (log scale: they differ ~1000x)."""
    sent = run.comm[run.comm["op"] == "send"].groupby(["rank", "tag"])["bytes"].sum().unstack(fill_value=0)
    fig = go.Figure()
    for k, tag in enumerate(sent.columns):
        label = "parameters (peer to peer)" if tag == "train" else "control (to / from the coordinator)"
        fig.add_trace(go.Bar(x=[f"rank {r}" + (" (coordinator)" if r == 0 else "") for r in sent.index],
                             y=sent[tag], name=label, marker_color=_colour(k)))
    fig.update_layout(title="Hybrid: bytes sent per rank", barmode="group", xaxis_title="rank",
                      yaxis={"title": "bytes sent", "type": "log"}, height=360)
    return fig


def training_figure(metrics: pd.DataFrame, title: str = "D-PSGD while it runs") -> go.Figure:
    """Loss of every rank and the consensus distance, side by side."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss per rank", "consensus distance Ξ"])
    if not metrics.empty and "loss" in metrics:
        for rank, rows in metrics.dropna(subset=["loss"]).groupby("rank"):
            fig.add_trace(go.Scatter(x=rows["step"], y=rows["loss"], name=f"rank {rank}",
                                     line={"color": _colour(rank)}), row=1, col=1)
        xi = metrics.dropna(subset=["consensus"]).groupby("step")["consensus"].mean()
        fig.add_trace(go.Scatter(x=xi.index, y=xi.values, name="Ξ", line={"color": "black"}), row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="cross-entropy", row=1, col=1)
    fig.update_yaxes(title_text="L2 distance", row=1, col=2)
    fig.update_layout(title=title, height=340)
    return fig


class LiveTraining:
    """dl.launch(..., live=LiveTraining()): training_figure as a widget, redrawn while the ranks run."""

    def __init__(self, title: str = "D-PSGD while it runs", every: float = 0.5):
        from IPython.display import display

        self.title, self.every, self._last = title, every, 0.0
        self.widget = go.FigureWidget(training_figure(pd.DataFrame(), title))
        display(self.widget)

    def update(self, run, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < self.every:
            return
        fig = training_figure(run.metrics, self.title)
        if [t.name for t in self.widget.data] == [t.name for t in fig.data]:
            with self.widget.batch_update():
                for shown, new in zip(self.widget.data, fig.data):
                    shown.x, shown.y = new.x, new.y
        else:  # the first rows arrived: add the traces (each already names its panel's axes)
            self.widget.data = ()
            self.widget.add_traces(list(fig.data))
        self._last = time.monotonic()

    def close(self, run) -> None:
        self.update(run, force=True)
