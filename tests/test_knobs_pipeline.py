"""The bubble knob of notebook 08: sliders for p and m redraw (p-1)/(m+p-1), GPipe's and 1F1B's ideal
timelines and the bubbles measured on real ranks, at the chosen (p, m); no browser, no launch on a slider move."""

import pytest

import distlab as dl
from distlab.parallel import pipeline as pp
from distlab.viz import parallel as vp


@pytest.fixture(scope="module")
def measured() -> list[dict]:
    """Bubbles measured on 2 real pipeline stages, m = 2 and 4 (the rows notebook 08 passes)."""
    rows = []
    for m in (2, 4):
        run = dl.launch(pp.pipeline_train, world_size=2, schedule="gpipe", micro_batches=m, batch_size=16, steps=2,
                        quiet=True, timeout=120)
        events = [e for r in run.results for e in r["events"]]
        rows.append(dict(schedule="gpipe", p=2, m=m, measured=pp.bubble_fraction(events, 2)))
    return rows


def parts(box):
    (stages, micro, schedule), said, curve, timeline = box.children[0].children, *box.children[1:]
    return stages, micro, schedule, said, curve, timeline


def trace(figure, name_starts: str):
    return next(t for t in figure.data if t.name.startswith(name_starts))


def test_moving_p_and_m_redraws_the_formula_the_ideal_timelines_and_the_chosen_point(measured):
    stages, micro, schedule, said, curve, timeline = parts(vp.bubble_explorer(measured, p=2, m=4))
    stages.value, micro.value = 4, 8
    formula = trace(curve, "(p−1)")
    assert formula.y[formula.x.index(8)] == pytest.approx(3 / 11)
    for name in ("GPipe, ideal", "1F1B, ideal"):  # 1F1B reorders the work but idles exactly as long
        assert trace(curve, name).y == pytest.approx(formula.y, abs=1e-9)
    star = trace(curve, "chosen")
    assert (star.x[0], star.y[0]) == (8, pytest.approx(3 / 11)) and star.name == "chosen: p = 4, m = 8"
    assert "3/11 = 0.273" in said.value and "no real run on 4 stages" in said.value
    assert sum(len(t.x) for t in timeline.data) == 2 * 4 * 8  # one bar per forward and per backward
    assert {y for t in timeline.data for y in t.y} == {f"stage {s}" for s in range(4)}
    micro.value = 1
    assert trace(curve, "chosen").y[0] == pytest.approx(3 / 4) and sum(len(t.x) for t in timeline.data) == 8


def test_the_bubbles_measured_on_real_ranks_appear_beside_the_formula_at_their_p_and_m(measured):
    stages, micro, schedule, said, curve, timeline = parts(vp.bubble_explorer(measured, p=2, m=4))
    shown = trace(curve, "GPipe, measured")
    assert list(shown.x) == [2, 4] and list(shown.y) == [row["measured"] for row in measured]
    assert all(f"m = {row['m']}: {row['measured']:.3f}" in said.value for row in measured)
    assert not trace(curve, "1F1B, measured").x  # no 1F1B run was measured
    micro.value = 16  # m moves the chosen point only: the measurements stay where they were measured
    assert list(trace(curve, "GPipe, measured").x) == [2, 4]
    assert trace(curve, "chosen").y[0] == pytest.approx(pp.predicted_bubble(2, 16))
    stages.value = 3
    assert not trace(curve, "GPipe, measured").x and "measured on p = [2]" in said.value


def test_the_schedule_menu_redraws_the_timeline_gpipe_forwards_first_1f1b_interleaved(measured):
    stages, micro, schedule, said, curve, timeline = parts(vp.bubble_explorer(measured, p=4, m=8))

    def stage0(kind):
        bars = trace(timeline, kind)
        return [base for base, y in zip(bars.base, bars.y) if y == "stage 0"]

    assert max(stage0("forward")) < min(stage0("backward"))  # GPipe: every forward before any backward
    schedule.value = "1f1b"
    assert max(stage0("forward")) > min(stage0("backward"))  # 1F1B: a forward after the first backward
    assert "bubble 0.273" in timeline.layout.title.text  # the same bubble
