"""The live dashboard: a progress bar and the training figure, redrawn while the ranks run.

dl.launch(..., live=True) creates one; the launcher calls update(run) as it waits and close(run) at
the end. Inside Jupyter it draws a plotly FigureWidget; elsewhere (scripts, CI) only a text bar.
"""

from __future__ import annotations

import time

import plotly.graph_objects as go
from tqdm.auto import tqdm

from .figures import training_figure


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


class Dashboard:
    """Progress (steps of the slowest rank) and the four panels of training_figure, kept current."""

    def __init__(self, every: float = 0.5, figure: bool | None = None):
        self.every = every
        self.widget = (go.FigureWidget(training_figure(_empty()))
                       if (figure if figure is not None else _in_notebook()) else None)
        self._bar: tqdm | None = None
        self._last = 0.0
        self._interval = every
        if self.widget is not None:
            from IPython.display import display

            display(self.widget)

    def update(self, run, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < self._interval:
            return
        started = time.monotonic()
        metrics = run.metrics
        self._advance(run, metrics)
        if self.widget is not None:
            self._redraw(explain_sampling(training_figure(metrics), metrics))
        self._last = time.monotonic()
        # Redrawing competes with the ranks for the same cores: keep it under a tenth of the time.
        self._interval = max(self.every, 10 * (self._last - started))

    def close(self, run) -> None:
        self.update(run, force=True)
        if self._bar is not None:
            self._bar.close()

    def _advance(self, run, metrics) -> None:
        total = run.total_steps
        if self._bar is None:
            self._bar = tqdm(total=total, desc=f"{run.world_size} ranks", unit="step")
        elif total and self._bar.total != total:  # the function announced it after we started
            self._bar.reset(total=total)
        if not metrics.empty and "step" in metrics:
            done = int(metrics.groupby("rank")["step"].max().min()) + 1  # the slowest rank sets the pace
            self._bar.update(done - self._bar.n)

    def _redraw(self, fig: go.Figure) -> None:
        same_traces = [(t.name, t.xaxis, t.yaxis) for t in self.widget.data] == [
            (t.name, t.xaxis, t.yaxis) for t in fig.data]
        if same_traces:
            with self.widget.batch_update():
                for shown, new in zip(self.widget.data, fig.data):
                    shown.x, shown.y = new.x, new.y
        else:
            self.widget.data = ()
            self.widget.add_traces(list(fig.data))
            self.widget.layout.annotations = fig.layout.annotations


def sampling_interval(metrics) -> int:
    """Every how many steps the gradient norms were recorded (ctx.watch(model, every=k)): 1 if every step."""
    columns = [c for c in metrics.columns if c.startswith("grad/")]
    if not columns or "step" not in metrics:
        return 1
    first = metrics[metrics["rank"] == metrics["rank"].min()]
    steps = first.dropna(subset=columns[:1])["step"].sort_values().diff().dropna()
    return int(steps.min()) if len(steps) else 1


def explain_sampling(fig: go.Figure, metrics) -> go.Figure:
    """Say on the gradient panel's title when its norms are a sample, so a sparse curve is not misread."""
    every = sampling_interval(metrics)
    if every > 1:
        for note in fig.layout.annotations:
            if note.text.startswith("gradient norm"):
                note.text += f", every {every} steps (ctx.watch(model, every={every}))"
    return fig


def _empty():
    import pandas as pd

    return pd.DataFrame()
