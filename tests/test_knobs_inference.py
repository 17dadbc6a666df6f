"""The micro-batch knob of notebook 09: a slider over the micro-batch sizes measured on real ranks marks each
setup's measured latency and throughput at the chosen size; no browser, no launch on a slider move."""

import pytest

import distlab as dl
from distlab.parallel import inference
from distlab.viz import parallel as vp

SETUPS = {"pipelined, 2 stages": 2, "single process": 1}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Latency and throughput of 32 requests served at micro-batches of 1 and 16, as notebook 09 measures them."""
    measured = []
    for micro_batch in (1, 16):
        for setup, stages in SETUPS.items():
            run = dl.launch(inference.serve_pipelined, world_size=2, n_requests=32, micro_batch=micro_batch,
                            stages=stages, quiet=True, timeout=120)
            events = [e for r in run.results for e in r["events"]]
            measured.append(dict(setup=setup, micro_batch=micro_batch,
                                 **inference.latency_throughput(events, n_requests=32)))
    return measured


def marked(box) -> dict[str, tuple[float, float]]:
    """The ring's points, by setup: (throughput, latency_ms)."""
    ring = box.children[2].data[-1]
    return {setup: (x, y) for setup, x, y in zip(ring.text, ring.x, ring.y)}


def at(rows, micro_batch) -> dict[str, tuple[float, float]]:
    return {r["setup"]: (r["throughput"], r["latency_ms"]) for r in rows if r["micro_batch"] == micro_batch}


def test_the_slider_marks_each_setups_measured_point_at_the_chosen_micro_batch(rows):
    box = vp.micro_batch_explorer(rows, micro_batch=16)
    pick, said, fig = box.children
    assert list(pick.options) == [1, 16] and marked(box) == at(rows, 16)
    curves = [(t.name, tuple(t.x), tuple(t.y)) for t in fig.data[:-1]]
    pick.value = 1
    assert marked(box) == at(rows, 1) and fig.data[-1].name == "chosen: b = 1"
    assert [(t.name, tuple(t.x), tuple(t.y)) for t in fig.data[:-1]] == curves  # the measured curves stay
    for setup, (throughput, latency) in at(rows, 1).items():
        assert f"{setup}: latency {latency:.2f} ms, {throughput:,.0f} requests/s" in said.value


def test_each_curve_runs_through_its_setups_measurements_in_micro_batch_order(rows):
    fig = vp.micro_batch_explorer(rows).children[2]
    for setup in SETUPS:
        curve = next(t for t in fig.data if t.name == setup)
        assert list(curve.text) == ["b=1", "b=16"]
        assert list(zip(curve.x, curve.y)) == [at(rows, b)[setup] for b in (1, 16)]


def test_a_micro_batch_that_was_not_measured_is_refused_with_the_sizes_that_were(rows):
    with pytest.raises(ValueError, match=r"micro_batch=8 was not measured; choose one of \[1, 16\]"):
        vp.micro_batch_explorer(rows, micro_batch=8)
