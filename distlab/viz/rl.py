"""Figures of distributed RL runs (rl/actor_learner.py, rl/on_ray.py): return against wall time and environment steps,
environment steps per second against actors, and how stale the trajectories were.

Every function takes learner results (the dict rl.train_local / rl_ray.train return, or a Run from
dl.launch(rl.train, ...)); the comparisons take a dict label -> result.
"""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from distlab.rl.actor_learner import SOLVED, WINDOW

from .figures import _colour


def learner_result(source) -> dict:
    """The learner's result from a result dict or from a Run of rl.train (rank 0)."""
    return source.results[0] if hasattr(source, "results") else source


def run_name(source) -> str:
    """'torch.distributed, async, 2 actors': the engine, the mode and the actors a run really had."""
    r = learner_result(source)
    return f"{r['engine']}, {r['mode']}, {r['actors']} actor{'s' * (r['actors'] > 1)}"


def episodes(source) -> pd.DataFrame:
    """One row per trajectory: t, actor, version, learner_version, staleness, ret, env_steps, used."""
    return pd.DataFrame(learner_result(source)["episodes"])


def summary(runs: dict) -> pd.DataFrame:
    """Per run: engine, mode, actors, env steps, seconds, steps/s, episodes, updates, mean return of the
    last 100 episodes, and the environment step at which that average first reached 195 (if it did)."""
    rows = []
    for name, source in runs.items():
        r, eps = learner_result(source), episodes(source)
        rolling = eps["ret"].rolling(WINDOW).mean()
        solved = eps["env_steps"][rolling >= SOLVED]
        rows.append({"run": name, "engine": r["engine"], "mode": r["mode"], "actors": r["actors"],
                     "env_steps": r["env_steps"], "seconds": round(r["seconds"], 2),
                     "steps_per_s": round(r["env_steps"] / r["seconds"]), "episodes": len(eps),
                     "updates": r["updates"], "last_100_return": round(eps["ret"].tail(100).mean(), 1),
                     "solved_at_step": int(solved.iloc[0]) if len(solved) else None,
                     "max_staleness": int(eps["staleness"].max())})
    return pd.DataFrame(rows).set_index("run")


def returns_figure(runs: dict, smooth: int = 20,
                   title: str = "Episode return against wall time and environment steps") -> go.Figure:
    """Two panels: the return of each episode (moving average over `smooth`) against the learner's
    clock and against environment steps, with CartPole's 195 bar."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("against wall time", "against environment steps"))
    for i, (name, source) in enumerate(runs.items()):
        eps = episodes(source)
        avg = eps["ret"].rolling(smooth, min_periods=1).mean()
        for col, x in ((1, eps["t"]), (2, eps["env_steps"])):
            fig.add_trace(go.Scatter(x=x, y=avg, name=name, legendgroup=name, showlegend=col == 1,
                                     line=dict(color=_colour(i))), row=1, col=col)
    for col in (1, 2):
        fig.add_hline(y=SOLVED, line_dash="dot", line_color="grey", row=1, col=col)
    fig.update_xaxes(title_text="seconds since the learner started", row=1, col=1)
    fig.update_xaxes(title_text="environment steps", row=1, col=2)
    fig.update_yaxes(title_text=f"episode return (mean of {smooth})", row=1, col=1)
    fig.update_layout(title=title, height=380, legend_title_text="run")
    return fig


def throughput_figure(table: pd.DataFrame, per_step: float | None = None,
                      title: str = "Environment steps per second against actors") -> go.Figure:
    """Measured scaling: steps/s per number of actors, a line per engine (rows of `summary`); the seed's
    per-step loop as a dotted line when given. Log y: the gap is two orders of magnitude."""
    fig = go.Figure()
    for i, (engine, rows) in enumerate(table.groupby("engine", sort=False)):
        rows = rows.sort_values("actors")
        fig.add_trace(go.Scatter(x=rows["actors"], y=rows["steps_per_s"], mode="lines+markers", name=engine,
                                 line=dict(color=_colour(i))))
    low, high = table["steps_per_s"].min(), table["steps_per_s"].max()
    if per_step is not None:
        actors = sorted(table["actors"].unique())
        fig.add_trace(go.Scatter(x=[actors[0], actors[-1]], y=[per_step, per_step], mode="lines",
                                 line=dict(color="grey", dash="dot"),
                                 name=f"seed's per-step ray.get loop ({per_step:,.0f} steps/s)"))
        low = min(low, per_step)
    fig.update_xaxes(title_text="rollout actors", tickvals=sorted(table["actors"].unique()))
    fig.update_yaxes(title_text="environment steps per second", type="log",
                     range=[np.log10(low / 2), np.log10(high * 2)])
    fig.update_layout(title=title, height=380, legend_title_text="engine")
    return fig


def staleness_figure(runs: dict, cap: int = 10,
                     title: str = "How stale was each trajectory? (versions behind the learner)") -> go.Figure:
    """Share of trajectories that arrived k policy versions behind the learner (k >= `cap` in one bar), per run;
    the legend counts those dropped for exceeding `max_staleness` (or arriving after the run ended)."""
    fig = go.Figure()
    for i, (name, source) in enumerate(runs.items()):
        eps = episodes(source)
        share = eps["staleness"].clip(upper=cap).value_counts(normalize=True).sort_index()
        label = f"{name}: {(~eps['used']).sum()} of {len(eps)} dropped"
        fig.add_trace(go.Bar(x=share.index, y=share.values, name=label, marker_color=_colour(i)))
    fig.update_xaxes(title_text="staleness: learner version − version the trajectory was collected with",
                     tickvals=list(range(cap + 1)), ticktext=[str(k) for k in range(cap)] + [f"≥{cap}"])
    fig.update_yaxes(title_text="share of trajectories", tickformat=".0%")
    fig.update_layout(title=title, height=360, barmode="group", legend_title_text="run")
    return fig


def actors_knob(runs: dict, smooth: int = 20) -> widgets.VBox:
    """A slider over the number of rollout actors that were run (runs: label -> a learner result or a Run of
    rl.train; one per number of actors, the last kept): environment steps per second against actors, the
    chosen count marked, and that run's episode return against wall time. Redraws from the runs; launches
    nothing."""
    by_actors = {learner_result(source)["actors"]: source for source in runs.values()}
    counts = sorted(by_actors)
    rates = [learner_result(by_actors[n])["env_steps"] / learner_result(by_actors[n])["seconds"] for n in counts]
    fig = go.FigureWidget(make_subplots(rows=1, cols=2, subplot_titles=(
        "environment steps per second against actors", "episode return of the chosen run")))
    fig.add_scatter(x=counts, y=rates, mode="lines+markers", showlegend=False, line=dict(color="grey"), row=1, col=1)
    fig.add_scatter(x=counts[:1], y=rates[:1], mode="markers", showlegend=False, row=1, col=1,
                    marker=dict(size=16, color=_colour(1), symbol="circle-open", line=dict(width=3)))
    fig.add_scatter(x=[], y=[], mode="lines", showlegend=False, line=dict(color=_colour(1)), row=1, col=2)
    fig.add_hline(y=SOLVED, line_dash="dot", line_color="grey", row=1, col=2)
    fig.update_xaxes(title_text="rollout actors", tickvals=counts, row=1, col=1)
    fig.update_yaxes(title_text="environment steps per second", rangemode="tozero", row=1, col=1)
    fig.update_xaxes(title_text="seconds since the learner started", row=1, col=2)
    fig.update_yaxes(title_text=f"episode return (mean of {smooth})", row=1, col=2)
    fig.update_layout(height=380, title="Actors against throughput, measured in the runs above")
    slider = widgets.SelectionSlider(options=counts, value=counts[0], description="actors", continuous_update=False)

    def show(n: int) -> None:
        i, eps = counts.index(n), episodes(by_actors[n])
        with fig.batch_update():
            fig.data[1].x, fig.data[1].y = [n], [rates[i]]
            fig.data[2].x, fig.data[2].y = list(eps["t"]), list(eps["ret"].rolling(smooth, min_periods=1).mean())
            fig.layout.annotations[1].text = f"episode return with {n} actor{'s' * (n > 1)}: {rates[i]:,.0f} steps/s"

    slider.observe(lambda change: show(change["new"]), names="value")
    show(counts[0])
    return widgets.VBox([slider, fig])
