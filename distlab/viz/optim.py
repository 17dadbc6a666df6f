"""Figures of notebook 06: optimizer trajectories on 2-D loss surfaces (with sliders), and the
measurements of the distributed runs (loss per rank, large batches, local SGD, ZeRO, gradient noise)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from distlab.optim.rules import MomentumSGD, make

COLOURS = {"sgd": qualitative.Plotly[0], "momentum": qualitative.Plotly[1], "adam": qualitative.Plotly[2]}
NAMES = {"sgd": "SGD", "momentum": "momentum SGD", "adam": "Adam"}


@dataclass
class Surface:
    """A 2-D loss J(x, y), where to start, what to draw, and step sizes that show each optimizer."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    start: tuple[float, float]
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    lr: float
    adam_lr: float
    log_contours: bool = False
    minima: list[tuple[float, float]] = field(default_factory=list)


SURFACES = {
    "Rosenbrock": Surface(lambda x, y: (1 - x) ** 2 + 100 * (y - x**2) ** 2, (-1.2, 1.0),
                          (-2.0, 2.0), (-1.0, 3.0), lr=1e-3, adam_lr=0.2, log_contours=True, minima=[(1.0, 1.0)]),
    "ill-conditioned quadratic": Surface(lambda x, y: 0.5 * (x**2 + 50 * y**2), (-4.5, 1.0),
                                         (-5.0, 5.0), (-1.5, 1.5), lr=0.038, adam_lr=0.1, minima=[(0.0, 0.0)]),
    "saddle": Surface(lambda x, y: x**2 + y**4 / 4 - y**2 / 2, (2.0, 1e-3),
                      (-2.5, 2.5), (-1.6, 1.6), lr=0.02, adam_lr=0.05, minima=[(0.0, 1.0), (0.0, -1.0)]),
}


def _surface(name: str) -> Surface:
    if name not in SURFACES:
        raise ValueError(f"surface must be one of {sorted(SURFACES)}, got {name!r}")
    return SURFACES[name]


def trajectory(surface: str, optimizer: str, steps: int = 200, **hyper) -> np.ndarray:
    """The (steps+1, 2) path of distlab's `optimizer` from the surface's start, in float64."""
    s = _surface(surface)
    point = torch.tensor(s.start, dtype=torch.float64, requires_grad=True)
    opt = make(optimizer, [point], **hyper)
    path = [point.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        s.loss(point[0], point[1]).backward()
        opt.step()
        path.append(point.detach().clone())
    return torch.stack(path).numpy()


def _hyper(lr: float, adam_lr: float, momentum: float, beta1: float, beta2: float) -> dict:
    return {"sgd": {"lr": lr}, "momentum": {"lr": lr, "momentum": momentum},
            "adam": {"lr": adam_lr, "betas": (beta1, beta2)}}


def _contour(s: Surface) -> go.Contour:
    xs = np.linspace(*s.x_range, 160)
    ys = np.linspace(*s.y_range, 120)
    gx, gy = np.meshgrid(xs, ys)
    z = s.loss(torch.from_numpy(gx), torch.from_numpy(gy)).numpy()
    if s.log_contours:
        z = np.log10(z - z.min() + 1e-3)
    return go.Contour(x=xs, y=ys, z=z, colorscale="Greys", showscale=False, ncontours=30, opacity=0.6,
                      hoverinfo="skip", name="J(x, y)" + (" (log10)" if s.log_contours else ""))


def surface_figure(surface: str, steps: int = 200, lr: float | None = None, adam_lr: float | None = None,
                   momentum: float = 0.9, beta1: float = 0.9, beta2: float = 0.999) -> go.Figure:
    """Contours of the surface and the three optimizers' paths from the same start."""
    s = _surface(surface)
    hyper = _hyper(lr or s.lr, adam_lr or s.adam_lr, momentum, beta1, beta2)
    fig = go.Figure(_contour(s))
    for name, h in hyper.items():
        path = trajectory(surface, name, steps, **h)
        fig.add_scatter(x=path[:, 0], y=path[:, 1], mode="lines+markers", marker={"size": 3}, name=NAMES[name],
                        line={"color": COLOURS[name], "width": 4 if name == "sgd" else 2})
    fig.add_scatter(x=[p[0] for p in s.minima], y=[p[1] for p in s.minima], mode="markers", name="minimum",
                    marker={"symbol": "star", "size": 14, "color": "gold", "line": {"width": 1}})
    fig.update_xaxes(title_text="x", range=list(s.x_range))
    fig.update_yaxes(title_text="y", range=list(s.y_range))
    fig.update_layout(title=f"{surface}: {steps} steps from {s.start}", height=460, margin={"t": 50})
    return fig


def explorer(surface: str = "Rosenbrock", steps: int = 200) -> widgets.VBox:
    """Sliders for η, γ, β₁, β₂ (and the surface); a slider recomputes only the paths that use it."""
    s = _surface(surface)
    fig = go.FigureWidget(surface_figure(surface, steps))
    pick = widgets.Dropdown(options=list(SURFACES), value=surface, description="surface")
    lr = widgets.FloatLogSlider(value=s.lr, base=10, min=-4, max=0, step=0.05, description="η (SGD, mom.)",
                                readout_format=".1e")
    adam_lr = widgets.FloatLogSlider(value=s.adam_lr, base=10, min=-3, max=0, step=0.05, description="η (Adam)",
                                     readout_format=".1e")
    momentum = widgets.FloatSlider(value=0.9, min=0.0, max=0.99, step=0.01, description="γ")
    beta1 = widgets.FloatSlider(value=0.9, min=0.0, max=0.99, step=0.01, description="β₁")
    beta2 = widgets.FloatSlider(value=0.999, min=0.5, max=0.9999, step=0.0001, description="β₂", readout_format=".4f")
    style = {"description_width": "90px"}
    for w in (pick, lr, adam_lr, momentum, beta1, beta2):
        w.style = style

    paths = dict(zip(NAMES, fig.data[1:]))  # after the contour, one trace per optimizer
    uses = {lr: ("sgd", "momentum"), momentum: ("momentum",), adam_lr: ("adam",), beta1: ("adam",), beta2: ("adam",)}

    def new_surface(change) -> None:
        chosen = SURFACES[change["new"]]
        with lr.hold_trait_notifications(), adam_lr.hold_trait_notifications():
            lr.value, adam_lr.value = chosen.lr, chosen.adam_lr
        redraw_all()

    def redraw_all() -> None:
        new = surface_figure(pick.value, steps, lr.value, adam_lr.value, momentum.value, beta1.value, beta2.value)
        with fig.batch_update():
            for old, trace in zip(fig.data, new.data):
                old.update(trace.to_plotly_json())
            fig.layout.title = new.layout.title
            fig.layout.xaxis.range, fig.layout.yaxis.range = new.layout.xaxis.range, new.layout.yaxis.range

    def redraw(names: tuple[str, ...]) -> None:
        hyper = _hyper(lr.value, adam_lr.value, momentum.value, beta1.value, beta2.value)
        with fig.batch_update():
            for name in names:
                path = trajectory(pick.value, name, steps, **hyper[name])
                paths[name].x, paths[name].y = path[:, 0], path[:, 1]

    pick.observe(new_surface, names="value")
    for w, names in uses.items():
        w.observe(lambda _, names=names: redraw(names), names="value")
    controls = widgets.HBox([widgets.VBox([pick, lr, adam_lr]), widgets.VBox([momentum, beta1, beta2])])
    return widgets.VBox([controls, fig])


def folding_figure(steps: int = 200, change_at: int = 100, lr: tuple[float, float] = (0.03, 0.003),
                   momentum: float = 0.9) -> go.Figure:
    """Distance between MomentumSGD (η folded into v) and torch.optim.SGD(momentum) on the
    ill-conditioned quadratic, once with a constant η and once with η dropped at `change_at`."""
    s = SURFACES["ill-conditioned quadratic"]
    fig = go.Figure()
    for label, drop in (("constant η", False), (f"η ÷ {lr[0] / lr[1]:g} at step {change_at}", True)):
        points = [torch.tensor(s.start, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        opts = [MomentumSGD([points[0]], lr=lr[0], momentum=momentum),
                torch.optim.SGD([points[1]], lr=lr[0], momentum=momentum)]
        gap = []
        for step in range(steps):
            for point, opt in zip(points, opts):
                if drop and step == change_at:
                    opt.param_groups[0]["lr"] = lr[1]
                opt.zero_grad()
                s.loss(point[0], point[1]).backward()
                opt.step()
            gap.append((points[0] - points[1]).norm().item())
        fig.add_scatter(x=list(range(1, steps + 1)), y=gap, name=label, mode="lines")
    fig.update_layout(title="ours (v ← γv + ηg) vs torch.optim.SGD(momentum): distance between the two θ",
                      xaxis_title="step", yaxis_title="‖θ_ours − θ_torch‖", height=360)
    return fig


def loss_curves_figure(runs: dict) -> go.Figure:
    """One panel per optimizer (name → Run): the loss of every rank on its own shard."""
    fig = make_subplots(rows=1, cols=len(runs), subplot_titles=[NAMES.get(n, n) for n in runs], shared_yaxes=True)
    for col, run in enumerate(runs.values(), start=1):
        for rank, rows in run.metrics.dropna(subset=["loss"]).groupby("rank"):
            fig.add_scatter(x=rows["step"], y=rows["loss"], name=f"rank {rank}", legendgroup=f"rank {rank}",
                            showlegend=col == 1, line={"color": qualitative.Plotly[3 + rank % 7], "width": 1},
                            row=1, col=col)
        fig.update_xaxes(title_text="step", row=1, col=col)
    fig.update_yaxes(title_text="training loss (own mini-batch)", row=1, col=1)
    fig.update_layout(title="Data-parallel training, same data and start, three optimizers: loss per rank", height=380)
    return fig


def large_batch_figure(table: pd.DataFrame) -> go.Figure:
    """Test accuracy against the global batch N·b, with and without the linear scaling rule."""
    fig = go.Figure()
    for label, rows in table.groupby("rule"):
        fig.add_scatter(x=rows["global_batch"], y=rows["accuracy"], mode="lines+markers", name=label,
                        text=[f"η={lr:.2g}, {s} steps" for lr, s in zip(rows["lr"], rows["steps"])])
    fig.update_xaxes(type="log", title_text="global batch N·b (log)")
    fig.update_yaxes(title_text="test accuracy", range=[0, 1])
    fig.update_layout(title="Same number of epochs, bigger global batch: linear η scaling + warm-up", height=380)
    return fig


def local_sgd_figure(table: pd.DataFrame) -> go.Figure:
    """Test accuracy against the bytes each rank sent, one point per averaging period H."""
    fig = go.Figure(go.Scatter(x=table["bytes_per_rank"], y=table["accuracy"], mode="markers+text+lines",
                               text=[f"H={h}" for h in table["every"]], textposition="top center",
                               marker={"size": 10}, name="local SGD"))
    fig.update_xaxes(type="log", title_text="bytes all-reduced per rank (log)")
    fig.update_yaxes(title_text="test accuracy of the averaged model", range=[0.5, 1])
    fig.update_layout(title="Local SGD: average the models every H steps", height=360)
    return fig


def zero_figure(results: list[dict]) -> go.Figure:
    """Optimizer-state bytes on each rank: unsharded Adam, ZeRO-1 by hand, torch's ZeroRedundancyOptimizer."""
    labels = {"adam": "Adam (ours, unsharded)", "sharded": "ZeRO-1 (ours)", "torch": "torch.optim.Adam",
              "zero": "ZeroRedundancyOptimizer"}
    fig = go.Figure()
    for key, label in labels.items():
        fig.add_bar(x=[f"rank {r}" for r in range(len(results))], y=[res["state_bytes"][key] for res in results],
                    name=label)
    fig.update_layout(title="Optimizer state held by each rank", yaxis_title="bytes", xaxis_title="rank",
                      barmode="group", height=360)
    return fig


def noise_figure(variance: dict[int, float]) -> go.Figure:
    """Measured E‖ḡₙ − ∇J‖² against n, beside the 1/n line through n = 1."""
    ns = sorted(variance)
    fig = go.Figure()
    fig.add_scatter(x=ns, y=[variance[n] for n in ns], mode="lines+markers", name="measured")
    fig.add_scatter(x=ns, y=[variance[ns[0]] * ns[0] / n for n in ns], mode="lines", name="1/n",
                    line={"dash": "dash", "color": "grey"})
    fig.update_xaxes(type="log", title_text="ranks averaged n (log)", tickvals=ns)
    fig.update_yaxes(type="log", title_text="E‖ḡₙ − ∇J‖² (log)")
    fig.update_layout(title="Gradient noise of the averaged gradient shrinks as 1/n", height=360)
    return fig
