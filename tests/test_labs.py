"""The labs machinery: every exercise passes with its reference solution, a stub is 'not attempted',
claims check themselves, predictions are set beside measurements, progress is recorded and gathered."""

import importlib
import json

import pytest

from distlab import labs
from distlab.labs import grading

EXERCISES = labs.all_exercises()


def reference(exercise: str):
    notebook, _, name = exercise.partition(".")
    return getattr(importlib.import_module(f"distlab.labs.solutions.ref{notebook}"), name)


def test_the_course_has_its_labs():
    assert len(EXERCISES) >= 3
    for exercise in EXERCISES:
        assert callable(reference(exercise)), f"{exercise} has no reference solution"


@pytest.mark.parametrize("exercise", list(EXERCISES))
def test_the_reference_solution_passes(exercise, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTLAB_PROGRESS", str(tmp_path / "progress.jsonl"))
    verdict = labs.check(exercise, reference(exercise), figure=False)
    assert verdict.passed, str(verdict)


def stub(*args, **kwargs):
    raise NotImplementedError


def test_a_stub_is_not_attempted_and_recorded(monkeypatch, tmp_path):
    progress = tmp_path / "progress.jsonl"
    monkeypatch.setenv("DISTLAB_PROGRESS", str(progress))
    verdict = labs.check("02.topk_error_feedback", stub)
    assert verdict.status == "not attempted" and not verdict.passed
    assert "replace `raise NotImplementedError`" in str(verdict) and "not attempted" in verdict._repr_html_()
    with pytest.raises(AssertionError, match="not attempted yet"):
        verdict.require()
    row = json.loads(progress.read_text())
    assert row["exercise"] == "02.topk_error_feedback" and row["status"] == "not attempted"
    assert oct(progress.stat().st_mode & 0o777) == "0o600"


def test_progress_shows_every_exercise_and_gather_makes_a_class_table(monkeypatch, tmp_path):
    alice, bob = tmp_path / "alice.jsonl", tmp_path / "bob.jsonl"
    monkeypatch.setenv("DISTLAB_PROGRESS", str(alice))
    labs.check("02.topk_error_feedback", stub)
    labs.check("02.topk_error_feedback", reference("02.topk_error_feedback"))
    table = labs.progress()
    assert set(EXERCISES) == set(table.index)
    assert table.loc["02.topk_error_feedback", "tries"] == 2
    assert table.loc["02.topk_error_feedback", "status"] == "passed"
    assert table.loc["02.ring_all_reduce", "status"] == "not attempted"
    bob.write_text(alice.read_text().replace('"student": "', '"student": "bob-'))
    rows = labs.gather([alice, bob])
    assert len(rows) == 2 and list(rows["passed"]) == [1, 1]


def test_an_unknown_exercise_says_which_exist():
    with pytest.raises(ValueError, match=r"no exercise '02.nope'; exercises of notebook 02: .*02.ring_all_reduce"):
        grading.find("02.nope")


def test_a_claim_checks_itself(capsys):
    labs.expect(0.249, near=0.25, rel=0.05, says="bubble fraction for p=2, m=4")
    assert "✓ bubble fraction for p=2, m=4: measured 0.249 (expected 0.25 ±5%)" in capsys.readouterr().out
    with pytest.raises(labs.ClaimFailed, match="strong mode has no stale read"):
        labs.expect(3, equals=0, says="strong mode has no stale read")
    assert "✗ strong mode has no stale read" in capsys.readouterr().out
    labs.expect(0.6, at_most=1.0, says="bounded")
    with pytest.raises(ValueError, match="exactly one of"):
        labs.expect(1, near=1, at_most=2, says="two checks")


def test_a_prediction_is_set_beside_the_measurement(capsys):
    guess = labs.predict("Bytes each rank sends?", unit="bytes")
    labs.expect(6006, near=6006, rel=0.01, says="ring bytes per rank", prediction=guess)
    assert "no prediction locked in" in capsys.readouterr().out
    guess.value = 12_000
    labs.expect(6006, near=6006, rel=0.01, says="ring bytes per rank", prediction=guess)
    assert "you predicted 12,000 bytes: over by 100%" in capsys.readouterr().out
    choice = labs.predict("Which is faster?", choices=["ring", "naive"])
    choice.value = "ring"
    labs.expect("ring", equals="ring", says="fastest", prediction=choice)
    assert "you predicted 'ring': right" in capsys.readouterr().out
