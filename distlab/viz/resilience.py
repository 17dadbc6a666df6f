"""Figures and controls for fault tolerance: restarts, stragglers, and the chaos panel."""

from __future__ import annotations

import ipywidgets as widgets
from plotly.subplots import make_subplots

from distlab.resilience.faults import FaultControl

from .figures import _colour


def _steps(run):
    rows = run.metrics
    return rows[rows["step"].notna()].copy() if "step" in rows else rows.iloc[0:0]


def restart_figure(run, title: str = "A rank killed, the job restarted from its checkpoint"):
    """Left: loss by step, one line per rank and attempt (the overlap is the work redone since the last
    checkpoint). Right: the step reached over wall time (the flat stretch is the downtime)."""
    rows = _steps(run)
    t0 = rows["t"].min()
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss by step", "progress over wall time"))
    for (attempt, rank), part in rows.groupby(["attempt", "rank"]):
        style = {"color": _colour(int(rank)), "dash": "solid" if attempt == 0 else "dot"}
        group = {"legendgroup": f"{attempt}-{rank}", "name": f"attempt {int(attempt)} · rank {int(rank)}"}
        fig.add_scatter(x=part["step"], y=part["loss"], mode="lines", line=style, **group, row=1, col=1)
        fig.add_scatter(x=part["t"] - t0, y=part["step"], mode="lines", line=style, showlegend=False, **group,
                        row=1, col=2)
    for attempt, part in rows.groupby("attempt"):
        if attempt > 0:
            fig.add_vline(x=part["step"].min(), line_dash="dash", row=1, col=1,
                          annotation_text=f"attempt {int(attempt)} resumes at step {int(part['step'].min())}")
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_yaxes(title_text="training loss", row=1, col=1)
    fig.update_xaxes(title_text="seconds since launch", row=1, col=2)
    fig.update_yaxes(title_text="step", row=1, col=2)
    fig.update_layout(title=title, legend={"orientation": "h", "y": -0.25}, height=400)
    return fig


def straggler_figure(runs: dict, title: str = "A straggler: everyone waits, or the deadline drops it"):
    """Step time and how many ranks' gradients made it into each step, for several runs."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("time per step (ms)", "gradients averaged per step"))
    for i, (label, run) in enumerate(runs.items()):
        per_step = _steps(run).groupby("step")[["step_seconds", "contributors"]].mean()
        style = {"color": _colour(i)}
        fig.add_scatter(x=per_step.index, y=per_step["step_seconds"] * 1000, name=label, line=style, row=1, col=1)
        fig.add_scatter(x=per_step.index, y=per_step["contributors"], name=label, line=style, showlegend=False,
                        row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="ms", row=1, col=1)
    fig.update_yaxes(title_text="ranks", rangemode="tozero", row=1, col=2)
    fig.update_layout(title=title, legend={"orientation": "h", "y": -0.25}, height=380)
    return fig


def chaos_panel(control: FaultControl, world_size: int) -> widgets.VBox:
    """Buttons that slow down, heal or kill a rank of a running job, through `control`."""
    rank = widgets.Dropdown(options=list(range(world_size)), value=world_size - 1, description="rank")
    delay = widgets.IntSlider(value=100, min=0, max=500, step=10, description="delay (ms)")
    log = widgets.HTML("No orders yet.")

    def order(text: str, action):
        def click(_button):
            action()
            log.value = f"Sent: {text.format(rank=rank.value, ms=delay.value)}"
        return click

    buttons = []
    for label, text, action in (
        ("Slow down", "slow rank {rank} by {ms} ms per step", lambda: control.slow(rank.value, delay.value)),
        ("Heal", "rank {rank} back to full speed", lambda: control.heal(rank.value)),
        ("Kill", "kill rank {rank}", lambda: control.kill(rank.value)),
    ):
        button = widgets.Button(description=label, button_style="danger" if label == "Kill" else "")
        button.on_click(order(text, action))
        buttons.append(button)
    return widgets.VBox([widgets.HBox([rank, delay]), widgets.HBox(buttons), log])
