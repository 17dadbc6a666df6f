"""Figures for serving (notebook 09): decode cost per token with and without the KV cache, the continuously
batched batch step by step, KV memory held by a contiguous and a paged cache, the serving modes' latency
and throughput, and a knob that re-serves the stream with another batch size and arrival rate."""

from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..parallel import serving as sv


def decode_cost(lengths: list[int], costs: dict[str, list[float]],
                title: str = "cost of one generated token") -> go.Figure:
    """costs: mode -> seconds for one new token at each sequence length in lengths."""
    fig = go.Figure()
    for i, (mode, seconds) in enumerate(costs.items()):
        fig.add_scatter(x=list(lengths), y=[1e3 * s for s in seconds], name=mode, mode="lines+markers",
                        line=dict(color=qualitative.Plotly[i]))
    fig.update_layout(title=title, xaxis_title="positions already in the sequence",
                      yaxis_title="time for the next token (ms)", yaxis=dict(rangemode="tozero"))
    return fig


def occupancy(steps: list[dict], max_batch: int, title: str = "continuous batching: the batch at every step"
              ) -> go.Figure:
    """Requests decoded at each step (bars), with the requests that joined and left at that step."""
    x = [s["step"] for s in steps]
    fig = go.Figure()
    fig.add_bar(x=x, y=[s["batch"] for s in steps], name="requests in the batch", marker_color="#4C78A8")
    fig.add_scatter(x=x, y=[s["joined"] or None for s in steps], name="joined (prefill)", mode="markers",
                    marker=dict(symbol="triangle-up", size=9, color=qualitative.Plotly[2]))
    fig.add_scatter(x=x, y=[s["left"] or None for s in steps], name="left (finished)", mode="markers",
                    marker=dict(symbol="triangle-down", size=9, color=qualitative.Plotly[1]))
    fig.add_hline(y=max_batch, line_dash="dash", line_color="grey", annotation_text=f"max_batch = {max_batch}")
    fig.update_layout(title=title, xaxis_title="decode step", yaxis_title="requests", bargap=0.05)
    return fig


def kv_memory(runs: dict[str, list[dict]], title: str = "KV cache memory held, step by step") -> go.Figure:
    """runs: cache kind -> steps of a batched serve; positions reserved by each cache beside those in use."""
    fig = go.Figure()
    for i, (kind, steps) in enumerate(runs.items()):
        fig.add_scatter(x=[s["step"] for s in steps], y=[s["reserved"] for s in steps], name=f"{kind}: reserved",
                        mode="lines", line=dict(color=qualitative.Plotly[i]))
    first = next(iter(runs.values()))
    fig.add_scatter(x=[s["step"] for s in first], y=[s["used"] for s in first], name="positions in use",
                    mode="lines", line=dict(color="black", dash="dot"))
    fig.update_layout(title=title, xaxis_title="decode step", yaxis_title="cached positions (per layer)",
                      yaxis=dict(rangemode="tozero"))
    return fig


def modes(rows: list[dict], title: str = "serving the same stream four ways") -> go.Figure:
    """rows: dicts with mode and sv.metrics' keys; throughput on the left, latencies on the right."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("throughput", "latency per request"))
    names = [r["mode"] for r in rows]
    fig.add_bar(x=names, y=[r["tokens_per_s"] for r in rows], name="tokens/s", marker_color="#4C78A8",
                row=1, col=1)
    for i, (key, label) in enumerate([("ttft_p50_ms", "time to first token, p50"),
                                      ("latency_p50_ms", "latency p50"), ("latency_p95_ms", "latency p95")]):
        fig.add_bar(x=names, y=[r[key] for r in rows], name=label, marker_color=qualitative.Plotly[i + 1],
                    row=1, col=2)
    fig.update_yaxes(title_text="generated tokens / s", row=1, col=1)
    fig.update_yaxes(title_text="ms (log scale)", type="log", row=1, col=2)
    fig.update_xaxes(title_text="serving mode", row=1, col=1)
    fig.update_xaxes(title_text="serving mode", row=1, col=2)
    fig.update_layout(title=title, barmode="group", height=420)
    return fig


def batching_explorer(model, n_requests: int = 24, max_batch: int = 16, rate: float = 200.0) -> widgets.VBox:
    """Sliders for max_batch and the arrival rate: each change serves the seeded stream again (continuous
    batching, this process) and redraws the batch per step, with the stream's latency and throughput."""
    batch = widgets.IntSlider(value=max_batch, min=1, max=32, description="max_batch", continuous_update=False)
    arrivals = widgets.FloatLogSlider(value=rate, base=10, min=1, max=4, step=0.1, description="requests/s",
                                      readout_format=".0f", continuous_update=False)
    said = widgets.HTML()
    fig = go.FigureWidget()

    def redraw(_=None) -> None:
        result = sv.serve_batched(model, sv.request_stream(n_requests, arrivals.value), batch.value)
        m = sv.metrics(result["served"])
        new = occupancy(result["steps"], batch.value, f"{n_requests} requests arriving at {arrivals.value:.0f}/s, "
                                                      f"max_batch = {batch.value}")
        with fig.batch_update():
            fig.data = []
            fig.add_traces(new.data)
            fig.layout = new.layout
        said.value = (f"<b>{m['tokens_per_s']:.0f} tokens/s</b> · time to first token p50 {m['ttft_p50_ms']:.0f} ms · "
                      f"latency p50 {m['latency_p50_ms']:.0f} ms, p95 {m['latency_p95_ms']:.0f} ms")

    redraw()
    batch.observe(redraw, names="value")
    arrivals.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox([batch, arrivals]), said, fig])
