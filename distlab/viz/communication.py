"""Figures of communication: bytes against the analytic count, the alpha-beta fit and a knob over N and S
drawn from it, a replay of a real ring all-reduce from its recorded sends, a send/recv timeline,
compression, pub/sub coupling."""

from __future__ import annotations

import math

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..communication import cost
from .figures import _colour


def bytes_table(run, numel: int, element_size: int = 4) -> pd.DataFrame:
    """Bytes each rank sent per algorithm (recorded with ctx.comm.events(algorithm)) beside the count
    from the algorithm's schedule (cost.sent_bytes)."""
    n = run.comm["rank"].nunique()
    rows = []
    for algorithm in cost.ALGORITHMS:
        sends = run.comm[run.comm["op"] == f"{algorithm} send"]
        measured = sends.groupby("rank")["bytes"].sum()
        for rank in range(n):
            rows.append({"algorithm": algorithm, "rank": rank, "measured": int(measured.get(rank, 0)),
                         "analytic": cost.sent_bytes(algorithm, numel, element_size, n, rank)})
    table = pd.DataFrame(rows)
    table["equal"] = table["measured"] == table["analytic"]
    return table


# -- alpha-beta ---------------------------------------------------------------------------------------

def _model_of(algorithm: str) -> str:
    return "ring" if algorithm == "gloo" else algorithm  # gloo's CPU all-reduce is ring-based


def fit_table(rows: list[dict]) -> pd.DataFrame:
    """alpha (µs per message) and 1/beta (GB/s) per algorithm and world size, from time_all_reduces rows."""
    frame, fits = pd.DataFrame(rows), []
    for (n, algorithm), part in frame.groupby(["world_size", "algorithm"], sort=False):
        model = _model_of(algorithm)
        numels = (part["bytes"] // 4).tolist()
        nbytes = [cost.critical_bytes(model, k, 4, n) for k in numels]
        alpha, beta = cost.fit_alpha_beta([cost.message_rounds(model, n)] * len(part), nbytes, part["seconds"].tolist())
        fits.append({"world_size": n, "algorithm": algorithm, "alpha_us": alpha * 1e6,
                     "bandwidth_GBps": (1 / beta / 1e9) if beta > 0 else math.inf, "alpha": alpha, "beta": beta})
    return pd.DataFrame(fits)


def alpha_beta_figure(rows: list[dict]) -> go.Figure:
    """Measured seconds per all-reduce (markers) and the fitted t = alpha·rounds + beta·bytes (lines), log-log."""
    frame, fits = pd.DataFrame(rows), fit_table(rows)
    sizes = sorted(frame["bytes"].unique())
    worlds = sorted(frame["world_size"].unique())
    fig = make_subplots(rows=1, cols=len(worlds), subplot_titles=[f"{n} ranks" for n in worlds])
    for col, n in enumerate(map(int, worlds), start=1):
        for i, fit in enumerate(fits[fits["world_size"] == n].itertuples()):
            part = frame[(frame["world_size"] == n) & (frame["algorithm"] == fit.algorithm)]
            model, style = _model_of(fit.algorithm), {"color": _colour(i)}
            predicted = [cost.predict_seconds(fit.alpha, fit.beta, cost.message_rounds(model, n),
                                              cost.critical_bytes(model, s // 4, 4, n)) for s in sizes]
            fig.add_trace(go.Scatter(x=part["bytes"], y=part["seconds"], mode="markers", marker=style,
                                     name=f"{fit.algorithm} measured", legendgroup=fit.algorithm,
                                     showlegend=col == 1), row=1, col=col)
            fig.add_trace(go.Scatter(x=sizes, y=predicted, mode="lines", line=style, legendgroup=fit.algorithm,
                                     name=f"{fit.algorithm} fit: α={fit.alpha_us:.0f} µs, "
                                          f"1/β={fit.bandwidth_GBps:.2f} GB/s",
                                     showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(type="log", title_text="message size (bytes)", row=1, col=col)
        fig.update_yaxes(type="log", title_text="seconds per all-reduce", row=1, col=col)
    fig.update_layout(title="All-reduce time: measured vs the alpha-beta model", height=450)
    return fig


# -- the knob: the model over N and S, with the machine's alpha and beta -----------------------------------

MODELLED = {"naive": "naive", "recursive_doubling": "tree (recursive doubling)", "ring": "ring"}


def machine_alpha_beta(rows: list[dict]) -> tuple[float, float]:
    """One alpha and beta for this machine: fitted over the hand-written algorithms' timings together,
    each row with its own messages in a row and bytes on the critical path."""
    frame = pd.DataFrame(rows)
    frame = frame[frame["algorithm"].isin(cost.ALGORITHMS)]
    rounds = [cost.message_rounds(a, n) for a, n in zip(frame["algorithm"], frame["world_size"])]
    nbytes = [cost.critical_bytes(a, b // 4, 4, n) for a, b, n in zip(frame["algorithm"], frame["bytes"],
                                                                     frame["world_size"])]
    alpha, beta = cost.fit_alpha_beta(rounds, nbytes, frame["seconds"].tolist())
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"the timings give no positive alpha and beta (alpha={alpha:.3g} s, beta={beta:.3g} s/B): "
                         "time more sizes or more repeats")
    return alpha, beta


def modelled_seconds(alpha: float, beta: float, algorithm: str, world_size: int, nbytes: int) -> float:
    """The alpha-beta model's time of one all-reduce of `nbytes` (float32) on `world_size` ranks."""
    return cost.predict_seconds(alpha, beta, cost.message_rounds(algorithm, world_size),
                                cost.critical_bytes(algorithm, max(1, nbytes // 4), 4, world_size))


def cost_knob(rows: list[dict], max_ranks: int = 64) -> widgets.VBox:
    """Sliders for N (ranks) and S (bytes, log scale) over the alpha-beta model with alpha and beta fitted to
    `rows` (time_all_reduces); left, time against S at N, with the measured points when N is the measured N;
    right, time against N at S. Redraws from the formula only."""
    alpha, beta = machine_alpha_beta(rows)
    frame = pd.DataFrame(rows)
    measured_n = int(frame["world_size"].iloc[0])
    sizes = [2 ** k for k in range(10, 31)]  # 1 KB ... 1 GB
    ranks = widgets.IntSlider(value=measured_n, min=2, max=max_ranks, description="N (ranks)",
                              continuous_update=False)
    payload = widgets.FloatLogSlider(value=2 ** 20, base=2, min=10, max=30, step=1, description="S (bytes)",
                                     readout_format=".3s", continuous_update=False)
    fig = go.FigureWidget(make_subplots(rows=1, cols=2, subplot_titles=["time against message size S, at N",
                                                                        "time against ranks N, at S"]))
    for i, (algorithm, name) in enumerate(MODELLED.items()):
        style = {"color": _colour(i)}
        fig.add_scatter(x=sizes, y=[0] * len(sizes), mode="lines", line=style, name=f"{name}: model",
                        legendgroup=algorithm, row=1, col=1)
        points = frame[frame["algorithm"] == algorithm]
        fig.add_scatter(x=points["bytes"].tolist(), y=points["seconds"].tolist(), mode="markers", marker=style,
                        name=f"{name}: measured, N = {measured_n}", legendgroup=algorithm, row=1, col=1)
        fig.add_scatter(x=list(range(2, max_ranks + 1)), y=[0] * (max_ranks - 1), mode="lines", line=style,
                        legendgroup=algorithm, showlegend=False, name=f"{name}: model", row=1, col=2)
    fig.add_scatter(x=[2 ** 20] * 2, y=[0, 0], mode="lines", line={"dash": "dot", "color": "grey"},
                    name="the chosen S / N", row=1, col=1)
    fig.add_scatter(x=[measured_n] * 2, y=[0, 0], mode="lines", line={"dash": "dot", "color": "grey"},
                    showlegend=False, name="the chosen N", row=1, col=2)
    fig.update_xaxes(type="log", title_text="message size S (bytes)", row=1, col=1)
    fig.update_xaxes(type="log", title_text="ranks N", row=1, col=2)
    fig.update_yaxes(type="log", title_text="seconds per all-reduce (model)", row=1, col=1)
    fig.update_yaxes(type="log", title_text="seconds per all-reduce (model)", row=1, col=2)
    fig.update_layout(height=470, margin={"t": 90})

    def redraw(_=None) -> None:
        n, s = ranks.value, int(payload.value)
        by_size = {a: [modelled_seconds(alpha, beta, a, n, b) for b in sizes] for a in MODELLED}
        by_ranks = {a: [modelled_seconds(alpha, beta, a, k, s) for k in range(2, max_ranks + 1)] for a in MODELLED}
        low = min(min(v) for v in (*by_size.values(), *by_ranks.values())) / 2
        high = max(max(v) for v in (*by_size.values(), *by_ranks.values())) * 2
        crossover = cost.crossover_bytes(alpha, beta, n)
        where = "never (the tree moves no more bytes)" if crossover is None else f"above S ≈ {crossover:,.0f} bytes"
        with fig.batch_update():
            for i, algorithm in enumerate(MODELLED):
                fig.data[3 * i].y = by_size[algorithm]
                fig.data[3 * i + 1].visible = n == measured_n
                fig.data[3 * i + 2].y = by_ranks[algorithm]
            fig.data[-2].x, fig.data[-2].y = [s, s], [low, high]
            fig.data[-1].x, fig.data[-1].y = [n, n], [low, high]
            fig.layout.title = (f"α–β model, α = {alpha * 1e6:.0f} µs, 1/β = {1 / beta / 1e9:.2f} GB/s (fitted to this "
                                f"notebook's timings)<br>N = {n}: the ring beats the tree {where}; at S = {s:,} B "
                                f"ring {by_size['ring'][sizes.index(s)] * 1e3:.3g} ms, naive "
                                f"{by_size['naive'][sizes.index(s)] * 1e3:.3g} ms")

    ranks.observe(redraw, names="value")
    payload.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([ranks, payload]), fig])


# -- the ring replay --------------------------------------------------------------------------------------

def _ring_positions(n: int) -> list[tuple[float, float]]:
    return [(math.cos(math.pi / 2 - 2 * math.pi * r / n), math.sin(math.pi / 2 - 2 * math.pi * r / n))
            for r in range(n)]


def _contributions(sends: list[dict], n: int) -> list[list[list[list[int]]]]:
    """After each step: for each rank and chunk, which ranks' data that chunk already holds (replayed
    from the record: a reduce-scatter receive merges the sender's set, an all-gather receive copies it)."""
    state = [[{r} for _ in range(n)] for r in range(n)]
    history = [[[sorted(s) for s in row] for row in state]]
    for step in sorted({e["step"] for e in sends}):
        before = [[set(s) for s in row] for row in state]
        for e in (e for e in sends if e["step"] == step):
            held = before[e["src"]][e["chunk"]]
            state[e["dst"]][e["chunk"]] = (state[e["dst"]][e["chunk"]] | held if e["phase"] == "reduce-scatter"
                                           else set(held))
        history.append([[sorted(s) for s in row] for row in state])
    return history


def ring_replay(events: list[list[dict]], frames_per_step: int = 5) -> go.Figure:
    """Animated replay of a recorded ring all-reduce: each chunk moves from sender to receiver, step by
    step, with the measured time of the step; the right panel shows how many ranks' data each chunk holds."""
    rows = [e for part in events for e in part]
    sends = sorted((e for e in rows if e["kind"] == "send"), key=lambda e: (e["step"], e["src"]))
    n = max(max(e["src"], e["dst"]) for e in sends) + 1
    t0 = min(e["t_start"] for e in rows)
    where, history = _ring_positions(n), _contributions(sends, n)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45],
                        subplot_titles=["chunks on the wire", "ranks' data in each chunk held"])
    ring = [where[r % n] for r in range(n + 1)]
    fig.add_trace(go.Scatter(x=[p[0] for p in ring], y=[p[1] for p in ring], mode="lines",
                             line={"color": "lightgrey", "width": 6}, hoverinfo="skip", showlegend=False), 1, 1)
    fig.add_trace(go.Scatter(x=[p[0] for p in where], y=[p[1] for p in where], mode="markers+text",
                             marker={"size": 46, "color": "white", "line": {"width": 2, "color": "black"}},
                             text=[f"rank {r}" for r in range(n)], showlegend=False, hoverinfo="skip"), 1, 1)

    def chunks_at(step: int, fraction: float) -> go.Scatter:
        moving = [e for e in sends if e["step"] == step]
        xs = [where[e["src"]][0] + fraction * (where[e["dst"]][0] - where[e["src"]][0]) for e in moving]
        ys = [where[e["src"]][1] + fraction * (where[e["dst"]][1] - where[e["src"]][1]) for e in moving]
        return go.Scatter(x=xs, y=ys, mode="markers+text", text=[f"c{e['chunk']}" for e in moving],
                          marker={"size": 26, "color": [_colour(e["chunk"]) for e in moving]},
                          textfont={"color": "white"}, showlegend=False,
                          hovertext=[f"rank {e['src']} → {e['dst']}: chunk {e['chunk']}, {e['bytes']} B"
                                     for e in moving])

    def held(after: int) -> go.Scatter:  # a grid of squares (a Heatmap goes blank while plotly animates)
        cells = [(r, c, len(ranks)) for r, row in enumerate(history[after]) for c, ranks in enumerate(row)]
        return go.Scatter(x=[c for _, c, _ in cells], y=[r for r, _, _ in cells], mode="markers+text",
                          text=[f"{k}/{n}" for *_, k in cells], showlegend=False,
                          textfont={"size": 15, "color": ["white" if k > n / 2 else "black" for *_, k in cells]},
                          marker={"symbol": "square", "size": 44, "color": [k for *_, k in cells], "cmin": 0, "cmax": n,
                                  "colorscale": "Blues", "colorbar": {"title": "ranks"}, "showscale": True})

    fig.add_trace(chunks_at(0, 0.2), 1, 1)
    fig.add_trace(held(0), 1, 2)
    frames, labels = [], []
    for step in sorted({e["step"] for e in sends}):
        moving = [e for e in sends if e["step"] == step]
        start_ms = (min(e["t_start"] for e in moving) - t0) * 1e3
        end_ms = (max(e["t_end"] for e in moving) - t0) * 1e3
        title = f"step {step} · {moving[0]['phase']} · measured {start_ms:.2f}–{end_ms:.2f} ms"
        # the chunks glide from 20% to 80% of the way; the table updates on arrival
        for f in range(frames_per_step + 1):
            last = f == frames_per_step
            frames.append(go.Frame(name=f"{step}.{f}", traces=[2, 3] if last else [2],
                                   layout={"title": {"text": title}},
                                   data=[chunks_at(step, 0.2 + 0.6 * f / frames_per_step)]
                                   + ([held(step + 1)] if last else [])))
        labels.append((str(step), f"{step}.{frames_per_step}"))
    fig.frames = frames
    play = {"frame": {"duration": 120, "redraw": True}, "transition": {"duration": 0}, "fromcurrent": True}
    fig.update_layout(
        title=f"Replay of a recorded ring all-reduce on {n} ranks: press play",
        height=480, xaxis={"visible": False, "range": [-1.4, 1.4]},
        yaxis={"visible": False, "range": [-1.4, 1.4], "scaleanchor": "x"},
        updatemenus=[{"type": "buttons", "x": 0.0, "y": -0.05, "buttons": [
            {"label": "▶ play", "method": "animate", "args": [None, play]},
            {"label": "❚❚ pause", "method": "animate",
             "args": [[None], {"mode": "immediate", "frame": {"duration": 0}}]}]}],
        sliders=[{"currentvalue": {"prefix": "after step "}, "y": -0.05, "x": 0.15, "len": 0.85, "steps": [
            {"label": label, "method": "animate",
             "args": [[frame], {"mode": "immediate", "frame": {"duration": 0, "redraw": True}}]}
            for label, frame in labels]}])
    fig.update_xaxes(title_text="chunk", tickvals=list(range(n)), range=[-0.6, n - 0.4], row=1, col=2)
    fig.update_yaxes(title_text="rank", tickvals=list(range(n)), range=[-0.6, n - 0.4], row=1, col=2)
    return fig


def timeline_figure(events: list[list[dict]], title: str = "Sends and receives per rank, as recorded") -> go.Figure:
    """One bar per recorded transfer, from issue to completion, per rank (ms since the first one)."""
    rows = pd.DataFrame([e for part in events for e in part])
    t0 = rows["t_start"].min()
    fig = go.Figure()
    for i, (phase, part) in enumerate(rows.groupby("phase", sort=False)):
        fig.add_trace(go.Bar(base=(part["t_start"] - t0) * 1e3, x=(part["t_end"] - part["t_start"]) * 1e3,
                             y=[f"rank {r} {k}" for r, k in zip(part["rank"], part["kind"])], orientation="h",
                             name=phase, marker_color=_colour(i),
                             hovertext=[f"chunk {c}, step {s}, {b} B"
                                        for c, s, b in zip(part["chunk"], part["step"], part["bytes"])]))
    fig.update_layout(title=title, barmode="overlay", height=350, xaxis_title="ms since the first send",
                      yaxis_title="rank, direction", yaxis={"categoryorder": "category descending"})
    return fig


# -- compression and pub/sub -----------------------------------------------------------------------------

def _label(result: dict) -> str:
    extra = {"topk": f" {result.get('ratio', 0.01):.0%}",
             "powersgd": f" rank {result.get('rank', 1)}"}.get(result["method"], "")
    feedback = "" if result.get("error_feedback", True) else " no feedback"
    return f"{result['method']}{extra}{feedback}"


def compression_table(results: list[dict]) -> pd.DataFrame:
    """Per method: bytes each rank sent, the share saved against the first (uncompressed) run, accuracy."""
    table = pd.DataFrame({"method": [_label(r) for r in results], "bytes sent": [r["bytes"] for r in results],
                          "test accuracy": [r["accuracy"] for r in results]})
    table["saved"] = 1 - table["bytes sent"] / table["bytes sent"].iloc[0]
    return table.set_index("method")


def compression_figure(results: list[dict]) -> go.Figure:
    """Bytes each rank sent during training (log) vs test accuracy reached, one point per method."""
    fig = go.Figure()
    for i, result in enumerate(results):
        fig.add_trace(go.Scatter(x=[result["bytes"]], y=[result["accuracy"]], mode="markers+text",
                                 text=[_label(result)], textposition="bottom center" if i % 2 else "top center",
                                 name=_label(result),
                                 marker={"size": 12, "color": _colour(i)}))
    low, high = math.log10(min(r["bytes"] for r in results)), math.log10(max(r["bytes"] for r in results))
    fig.update_layout(title="Gradient compression: bytes sent vs accuracy reached (digits, same training)",
                      xaxis={"type": "log", "title": "bytes sent per rank (log scale)",
                             "range": [low - 0.4, high + 0.4]},
                      yaxis={"title": "test accuracy"}, height=450)
    return fig


def coupling_figure(results: list[dict]) -> go.Figure:
    """Per rank: seconds spent in publish() vs in a synchronous all_reduce while one rank is late."""
    ranks = [f"rank {r}" for r in range(len(results))]
    bars = [go.Bar(name=name, x=ranks, y=[r[key] for r in results], textposition="outside",
                   text=[f"{r[key] * 1e3:.2f} ms" for r in results])
            for name, key in (("publish() (pub/sub)", "publish_seconds"),
                              ("dist.all_reduce (collective)", "all_reduce_seconds"))]
    fig = go.Figure(bars)
    fig.update_layout(title="Coupling: waiting for a late rank", barmode="group", height=350,
                      xaxis_title="rank", yaxis_title="seconds in the call")
    return fig
