"""Figures and widgets of notebook 13: where a step's memory goes (measured beside the formula), a memory calculator,
ZeRO's bytes per rank, the overlap timeline, and the cluster simulator with its configuration widget."""

from __future__ import annotations

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from ..parallel import simulator as sim
from ..parallel.memory import StepMemory

KINDS = ("params", "grads", "optimizer", "activations", "temporaries")
COLOURS = {"params": "#4C78A8", "grads": "#F58518", "optimizer": "#54A24B", "activations": "#E45756",
           "temporaries": "#B0B0B0", "compute": "#4C78A8", "tensor": "#F58518", "pipeline": "#EECA3B",
           "data": "#E45756", "comm": "#E45756", "backward": "#72B7B2"}
GB = 1e9


def step_memory_figure(steps: dict[str, StepMemory]) -> go.Figure:
    """Bytes by kind for each measured configuration: measured bars beside the formula's (hatched)."""
    fig = go.Figure()
    for name, step in steps.items():
        kinds = [k for k in KINDS if k in step.formula]
        fig.add_trace(go.Bar(x=kinds, y=[step.measured[k] for k in kinds], name=f"{name} · measured"))
        fig.add_trace(go.Bar(x=kinds, y=[step.formula[k] for k in kinds], name=f"{name} · formula",
                             marker_pattern_shape="/"))
    fig.update_layout(title="bytes of one fp32 Adam step by kind: measured beside the formula", barmode="group",
                      xaxis_title="kind", yaxis_title="bytes (log scale)", yaxis_type="log", height=420)
    return fig


def _calculator_figure(model: sim.Model, plan: sim.Plan, micro_batch: int, precision: str,
                       tiny: StepMemory | None) -> go.Figure:
    mine = sim.memory_per_gpu(model, plan, micro_batch, precision)
    fig = go.Figure(go.Bar(x=list(mine), y=[v / GB for v in mine.values()], name="your configuration",
                           marker_color=[COLOURS[k] for k in mine]))
    if tiny is not None:
        kinds = list(tiny.formula)
        fig.add_trace(go.Bar(x=kinds, y=[tiny.measured[k] / GB for k in kinds], name="tiny GPT, measured (1 rank)"))
        fig.add_trace(go.Bar(x=kinds, y=[tiny.formula[k] / GB for k in kinds], name="tiny GPT, formula",
                             marker_pattern_shape="/"))
    total = sum(mine.values()) / GB
    fig.update_layout(title=f"memory per GPU: {total:,.2f} GB ({plan.gpus} GPUs, ZeRO-{plan.zero}, t={plan.tp}, "
                            f"p={plan.pp}{', recomputed' if plan.recompute else ''})",
                      barmode="group", xaxis_title="kind", yaxis_title="GB per GPU (log scale)", yaxis_type="log",
                      height=420, legend={"orientation": "h", "y": -0.2})
    return fig


def memory_calculator(tiny: StepMemory | None = None) -> widgets.VBox:
    """Model size, batch, sequence, precision, ZeRO stage, data/tensor/pipeline degrees, recomputation → bytes per
    GPU by kind (parallel/simulator.memory_per_gpu), the tiny GPT's measured step beside it."""
    style = {"description_width": "110px"}
    model = widgets.Dropdown(options=list(sim.MODELS), value="7B", description="model", style=style)
    batch = widgets.IntSlider(value=1, min=1, max=32, description="micro-batch", style=style)
    seq = widgets.Dropdown(options=[512, 1024, 2048, 4096, 8192], value=2048, description="sequence", style=style)
    precision = widgets.Dropdown(options=["mixed", "fp32"], value="mixed", description="precision", style=style)
    zero = widgets.Dropdown(options=[0, 1, 2, 3], value=0, description="ZeRO stage", style=style)
    dp = widgets.Dropdown(options=[1, 2, 4, 8, 16, 64, 256, 1024], value=8, description="data parallel", style=style)
    tp = widgets.Dropdown(options=[1, 2, 4, 8], value=1, description="tensor parallel", style=style)
    pp = widgets.Dropdown(options=[1, 2, 4, 8, 16], value=1, description="pipeline", style=style)
    recompute = widgets.Checkbox(value=False, description="recompute activations")
    controls = (model, batch, seq, precision, zero, dp, tp, pp, recompute)

    def current() -> go.Figure:
        chosen = sim.MODELS[model.value]
        chosen = sim.Model(chosen.n_layer, chosen.d_model, chosen.n_head, seq.value, chosen.vocab)
        plan = sim.Plan(dp.value, tp.value, pp.value, zero.value, micro_batches=max(1, pp.value),
                        recompute=recompute.value)
        return _calculator_figure(chosen, plan, batch.value, precision.value, tiny)

    fig = go.FigureWidget(current())

    def redraw(_) -> None:
        new = current()
        with fig.batch_update():
            fig.data[0].x, fig.data[0].y = new.data[0].x, new.data[0].y
            fig.layout.title = new.layout.title

    for control in controls:
        control.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox([widgets.VBox(controls[:5]), widgets.VBox(controls[5:])]), fig])


def zero_figure(methods: dict[str, dict], world_size: int) -> go.Figure:
    """Rank 0's bytes held by kind (after backward; Adam's state after the step) for each method, stacked."""
    fig = go.Figure([go.Bar(x=list(methods), y=[m["held"][kind] for m in methods.values()], name=kind,
                            marker_color=COLOURS[kind]) for kind in ("params", "grads", "optimizer")])
    fig.update_layout(title=f"bytes held per rank, {world_size} ranks: data parallel, ZeRO-1/2/3 by hand, FSDP2",
                      barmode="stack", xaxis_title="method", yaxis_title="bytes per rank", height=400)
    return fig


def overlap_figure(results: list[dict], title: str = "backward and bucket all-reduces, per rank",
                   xaxis_title: str = "time from the start of backward (ms)") -> go.Figure:
    """Per rank and mode, a compute lane (backward, or each layer's forward) and a communication lane (each bucket's
    all-reduce or each unit's all-gather, from its issue to its completion)."""
    rows = [{"lane": f"rank {rank} · {mode} · {span['kind']}", **span}
            for rank, result in enumerate(results) for mode, record in result.items() for span in record["spans"]]
    frame = pd.DataFrame(rows)
    for lane_mode in frame["lane"].str.extract(r"(rank \d+ · [^·]+)")[0].unique():
        mine = frame["lane"].str.startswith(lane_mode)
        frame.loc[mine, ["start", "end"]] -= frame.loc[mine, "start"].min()
    frame[["start", "end"]] *= 1000
    fig = go.Figure()
    for kind, spans in frame.groupby("kind"):
        fig.add_trace(go.Bar(y=spans["lane"], x=spans["end"] - spans["start"], base=spans["start"], orientation="h",
                             name=kind, marker={"color": COLOURS["backward" if kind == "compute" else "comm"],
                                                "opacity": 0.6}, customdata=spans[["name", "bytes"]],
                             hovertemplate="%{y}<br>%{customdata[0]}: %{base:.2f} ms, lasts %{x:.2f} ms"
                                           "<br>%{customdata[1]} bytes<extra></extra>"))
    fig.update_layout(title=title, barmode="overlay", xaxis_title=xaxis_title,
                      yaxis_title="rank · mode · lane", height=180 + 30 * frame["lane"].nunique())
    return fig


def _prediction_figure(prediction: sim.Prediction, title: str) -> go.Figure:
    parts = {"compute": prediction.compute, **prediction.exposed}
    fig = go.Figure([go.Bar(y=["step"], x=[seconds * 1000], name=name, orientation="h", marker_color=COLOURS[name])
                     for name, seconds in parts.items()])
    fig.update_layout(title=title, barmode="stack", xaxis_title="milliseconds per step (exposed)", height=260,
                      legend={"orientation": "h", "y": -0.5})
    return fig


def _describe(model_name: str, plan: sim.Plan, prediction: sim.Prediction) -> str:
    return (f"{model_name} on {plan.gpus} GPUs (dp={plan.dp}, tp={plan.tp}, pp={plan.pp}, ZeRO-{plan.zero}): "
            f"{prediction.seconds * 1000:,.0f} ms per step, {prediction.memory_total / GB:,.1f} GB per GPU "
            f"({'fits' if prediction.fits else 'does NOT fit'} in 80 GB), scaling efficiency "
            f"{prediction.efficiency:.0%}")


def simulator_widget(global_batch: int = 1024) -> widgets.VBox:
    """Pick a model, GPUs, tensor and pipeline degrees, ZeRO stage, recomputation, the network between nodes →
    the predicted step split into compute and exposed communication, memory per GPU, efficiency."""
    style = {"description_width": "100px"}
    model = widgets.Dropdown(options=list(sim.MODELS), value="7B", description="model", style=style)
    gpus = widgets.Dropdown(options=[8, 32, 128, 512, 1024, 4096], value=128, description="GPUs", style=style)
    tp = widgets.Dropdown(options=[1, 2, 4, 8], value=1, description="tensor", style=style)
    pp = widgets.Dropdown(options=[1, 2, 4, 8, 16], value=1, description="pipeline", style=style)
    zero = widgets.Dropdown(options=[0, 1, 2, 3], value=1, description="ZeRO", style=style)
    link = widgets.Dropdown(options=["infiniband", "ethernet"], value="infiniband", description="between nodes",
                            style=style)
    micro = widgets.Dropdown(options=[1, 2, 4, 8], value=1, description="micro-batch", style=style)
    recompute = widgets.Checkbox(value=False, description="recompute")
    text = widgets.HTML()
    controls = (model, gpus, tp, pp, zero, link, micro, recompute)

    def current() -> go.Figure:
        if gpus.value % (tp.value * pp.value):
            text.value = "tensor × pipeline must divide the GPUs"
            return _prediction_figure(sim.Prediction(0, 0, {"tensor": 0, "pipeline": 0, "data": 0}, {}, 0, False), "")
        dp = gpus.value // (tp.value * pp.value)
        plan = sim.Plan(dp, tp.value, pp.value, zero.value, max(1, global_batch // dp // micro.value), recompute.value)
        try:
            prediction = sim.predict(sim.MODELS[model.value], plan, global_batch, inter=sim.LINKS[link.value])
        except ValueError as error:
            text.value = str(error)
            return _prediction_figure(sim.Prediction(0, 0, {"tensor": 0, "pipeline": 0, "data": 0}, {}, 0, False), "")
        text.value = _describe(model.value, plan, prediction)
        return _prediction_figure(prediction, f"one step of {global_batch} sequences of 2,048 tokens")

    fig = go.FigureWidget(current())

    def redraw(_) -> None:
        new = current()
        with fig.batch_update():
            for old, trace in zip(fig.data, new.data):
                old.x = trace.x
            fig.layout.title = new.layout.title

    for control in controls:
        control.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox([widgets.VBox(controls[:4]), widgets.VBox(controls[4:])]), text, fig])


def guidance(gpus: tuple[int, ...] = (8, 64, 512, 4096), global_batch: int = 1024) -> pd.DataFrame:
    """The fastest plan that fits, per model size and GPU count (parallel/simulator.best_plans)."""
    rows = []
    for name, model in sim.MODELS.items():
        for n in gpus:
            plans = sim.best_plans(model, n, global_batch)
            if not plans:
                rows.append({"model": name, "GPUs": n, "plan": "does not fit", "ms per step": None,
                             "GB per GPU": None, "efficiency": None})
                continue
            plan, p = plans[0]
            rows.append({"model": name, "GPUs": n, "plan": f"dp={plan.dp} tp={plan.tp} pp={plan.pp} ZeRO-{plan.zero}"
                         + (" +recompute" if plan.recompute else ""), "ms per step": round(p.seconds * 1000),
                         "GB per GPU": round(p.memory_total / GB, 1), "efficiency": round(p.efficiency, 2)})
    return pd.DataFrame(rows)


def scaling_figure(table: pd.DataFrame) -> go.Figure:
    """Scaling efficiency of each model's best plan against the number of GPUs."""
    fig = go.Figure([go.Scatter(x=rows["GPUs"], y=rows["efficiency"], mode="lines+markers", name=name,
                                text=rows["plan"], hovertemplate="%{x} GPUs: %{y:.0%}<br>%{text}<extra></extra>")
                     for name, rows in table.dropna().groupby("model", sort=False)])
    fig.update_layout(title="predicted scaling efficiency of the fastest plan that fits", xaxis_type="log",
                      xaxis_title="GPUs (log scale)", yaxis_title="efficiency (ideal time / predicted)",
                      yaxis_range=[0, 1.05], height=420)
    return fig
