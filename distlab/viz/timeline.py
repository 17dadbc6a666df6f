"""Per-rank timelines of compute and communication (a Gantt chart), and bytes moved per step, drawn
from the spans each rank of distlab.parallel records (see parallel/data_parallel.py: Spans)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

COLOURS = {"forward": "#4C78A8", "backward": "#72B7B2", "optimizer": "#B0B0B0",
           "all_reduce": "#E45756", "send": "#F58518", "recv": "#EECA3B"}
SENT = ("all_reduce", "send")  # what a rank hands to the network; a recv is the same message counted at the other end


def spans_frame(results: list[dict]) -> pd.DataFrame:
    """Every rank's spans in one table (rank, step, kind, name, start, end, bytes); times in
    milliseconds from the first span of the run."""
    frame = pd.DataFrame([{"rank": rank, **row} for rank, result in enumerate(results) for row in result["spans"]])
    origin = frame["start"].min()
    frame[["start", "end"]] = (frame[["start", "end"]] - origin) * 1000
    return frame


def timeline_figure(results: list[dict], title: str, last_steps: int = 3) -> go.Figure:
    """Gantt chart of the last `last_steps` steps: per rank, a compute lane and a communication lane.
    A communication span lasts from the call to its return: it includes waiting for the other ranks
    (a recv waits for the matching send, an all-reduce for the slowest rank)."""
    frame = spans_frame(results)
    frame = frame[frame["step"] > frame["step"].max() - last_steps]
    frame[["start", "end"]] -= frame["start"].min()
    frame["lane"] = [f"rank {r} · {kind}" for r, kind in zip(frame["rank"], frame["kind"])]
    lanes = [f"rank {r} · {kind}" for r in sorted(frame["rank"].unique()) for kind in ("compute", "comm")]
    fig = go.Figure()
    order = {name: i for i, name in enumerate(COLOURS)}
    for name, spans in sorted(frame.groupby("name"), key=lambda item: order.get(item[0], len(order))):
        fig.add_trace(go.Bar(
            y=spans["lane"], x=spans["end"] - spans["start"], base=spans["start"], orientation="h", name=name,
            marker={"color": COLOURS.get(name, "#9D755D")}, customdata=spans[["step", "bytes"]],
            hovertemplate="%{y}<br>" + name + " · step %{customdata[0]}<br>%{base:.2f} ms, lasts %{x:.3f} ms"
                          "<br>%{customdata[1]} bytes<extra></extra>"))
    fig.update_yaxes(title_text="rank · lane", categoryorder="array", categoryarray=lanes[::-1])
    fig.update_xaxes(title_text="time (ms)", rangemode="tozero")
    fig.update_layout(title=title, barmode="overlay", height=140 + 36 * len(lanes), margin={"t": 50, "b": 40},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def bytes_per_step(results: list[dict]) -> pd.Series:
    """Payload bytes each rank hands to the network per step (all-reduces and sends), indexed by rank."""
    frame = spans_frame(results)
    sent = frame[frame["name"].isin(SENT)]
    steps = frame.groupby("rank")["step"].nunique()
    return (sent.groupby("rank")["bytes"].sum().reindex(steps.index, fill_value=0) / steps).astype(int)


def bytes_figure(patterns: dict[str, list[dict]]) -> go.Figure:
    """Bars of the bytes moved per step by each pattern (one run's results each), stacked by rank."""
    table = pd.DataFrame({pattern: bytes_per_step(results) for pattern, results in patterns.items()}).fillna(0)
    fig = go.Figure([go.Bar(x=table.columns, y=table.loc[rank], name=f"rank {rank}") for rank in table.index])
    fig.update_layout(title="payload bytes sent per step (all-reduces + sends), stacked by rank", barmode="stack",
                      xaxis_title="pattern", yaxis_title="bytes per step", height=420)
    return fig
