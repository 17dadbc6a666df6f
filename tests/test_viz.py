"""Figures drawn from runs: the dashboard's four panels, static and live."""

import pandas as pd

import distlab as dl
from distlab.viz import Dashboard, training_figure
from rank_fns import train_digits


def _traces_by_panel(fig):
    return {(t.xaxis, t.name) for t in fig.data}


def test_training_figure_draws_each_panel_from_the_metrics():
    rows = [{"rank": r, "step": s, "loss": 1.0 / (s + 1), "grad/0": 0.5, "drift": 0.1 if s == 0 else None,
             "comm_bytes": 100, "overhead_bytes": 8 if s == 0 else 0} for r in range(2) for s in range(3)]
    fig = training_figure(pd.DataFrame(rows))
    assert {("x", "rank 0"), ("x", "rank 1"), ("x2", "layer 0"), ("x3", "rank 0"), ("x4", "rank 1"),
            ("x4", "telemetry overhead (rank 0)")} <= _traces_by_panel(fig)
    loss = next(t for t in fig.data if t.xaxis == "x" and t.name == "rank 1")
    assert list(loss.y) == [1.0, 0.5, 1.0 / 3]
    assert not [a for a in fig.layout.annotations if "draws here" in a.text or "records" in a.text]


def test_an_empty_panel_says_how_to_fill_it():
    fig = training_figure(pd.DataFrame([{"rank": 0, "step": 0, "loss": 1.0, "comm_bytes": 0}]))
    hints = {a.text for a in fig.layout.annotations}
    assert "ctx.watch(model) records gradient norms" in hints
    assert "ctx.watch(model, drift_every=k) records drift" in hints


def test_live_dashboard_follows_the_run_to_the_last_step():
    dashboard = Dashboard(figure=True)
    run = dl.launch(train_digits, world_size=2, steps=30, live=dashboard)
    loss = [t for t in dashboard.widget.data if t.xaxis == "x"]
    assert sorted(t.name for t in loss) == ["rank 0", "rank 1"]
    assert all(len(t.y) == 30 for t in loss)
    assert dashboard._bar.n == 30 and dashboard._bar.total == 30
    assert len(run.figure().data) == len(dashboard.widget.data)
