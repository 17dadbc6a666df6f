"""Claims that check themselves, and predictions asked before a measurement.

`expect` prints the claim with its check (a ✓ line) and raises `ClaimFailed` when the number is wrong,
so a notebook whose figures went wrong fails its test instead of teaching a wrong lesson. `predict`
asks the student for a number or a choice before the cell that measures it; `expect(...,
prediction=p)` sets the guess beside the measurement. When nobody is there to answer (the test suite,
Run All), the prediction stays empty and the measurement is shown anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class ClaimFailed(AssertionError):
    """A number the notebook teaches came out wrong."""


@dataclass
class Prediction:
    """The student's answer to a question asked before the measurement; `value` is None until given."""

    question: str
    unit: str = ""
    choices: tuple = ()
    value: object = None
    widget: object = field(default=None, repr=False)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs) if self.widget is not None else {"text/plain": self.question}


def predict(question: str, *, unit: str = "", choices: tuple | list = ()) -> Prediction:
    """Ask before measuring: shows the question with a number box (or the choices) and a Lock in button.
    Display the returned object (last line of a cell); the measuring cell reads `.value`."""
    prediction = Prediction(question, unit, tuple(choices))
    prediction.widget = _widget(prediction)
    return prediction


def _widget(prediction: Prediction):
    import ipywidgets as widgets

    answer = (widgets.Dropdown(options=["(choose)", *prediction.choices]) if prediction.choices
              else widgets.FloatText(description="", layout={"width": "12em"}))
    lock = widgets.Button(description="Lock in", button_style="primary")
    said = widgets.HTML("")

    def locked(_):
        if prediction.choices and answer.value == "(choose)":
            said.value = "choose an answer first"
            return
        prediction.value = answer.value
        answer.disabled = lock.disabled = True
        said.value = f"locked in: <b>{prediction.value} {prediction.unit}</b>. Now run the next cell."

    lock.on_click(locked)
    label = widgets.HTML(f"<b>Predict first.</b> {prediction.question}")
    unit = widgets.HTML(prediction.unit)
    return widgets.VBox([label, widgets.HBox([answer, unit, lock]), said])


def expect(measured, *, says: str, near=None, rel: float | None = None, abs: float | None = None,
           at_most=None, at_least=None, equals=None, prediction: Prediction | None = None) -> None:
    """Print `says` with the measured value and its check; raise ClaimFailed when the check fails.

    One of: near= (with rel= and/or abs= tolerance), at_most=, at_least=, equals=. With a prediction,
    the student's guess is printed beside the measurement (a guess is never what fails)."""
    ok, check = _holds(measured, near, rel, abs, at_most, at_least, equals)
    print(f"{'✓' if ok else '✗'} {says}: measured {_show(measured)} ({check})")
    if prediction is not None:
        print("  " + _against_prediction(prediction, measured))
    if not ok:
        raise ClaimFailed(f"{says}: measured {_show(measured)}, {check}")


def _holds(measured, near, rel, abs_tol, at_most, at_least, equals) -> tuple[bool, str]:
    given = [x is not None for x in (near, at_most, at_least, equals)]
    if sum(given) != 1:
        raise ValueError("expect needs exactly one of near=, at_most=, at_least=, equals=")
    if equals is not None:
        return measured == equals, f"expected exactly {_show(equals)}"
    if at_most is not None:
        return measured <= at_most, f"expected at most {_show(at_most)}"
    if at_least is not None:
        return measured >= at_least, f"expected at least {_show(at_least)}"
    if rel is None and abs_tol is None:
        raise ValueError("near= needs a tolerance: rel= (relative) or abs= (absolute)")
    tolerance = max(rel * math.fabs(near) if rel is not None else 0.0, abs_tol or 0.0)
    spread = f"±{rel:.0%}" if rel is not None and (abs_tol is None or rel * math.fabs(near) >= abs_tol) \
        else f"±{_show(abs_tol)}"
    return math.fabs(measured - near) <= tolerance, f"expected {_show(near)} {spread}"


def _against_prediction(prediction: Prediction, measured) -> str:
    if prediction.value is None:
        return "(no prediction locked in: next time, guess first — it is how the number sticks)"
    guess = prediction.value
    if isinstance(guess, (int, float)) and isinstance(measured, (int, float)) and measured:
        off = (guess - measured) / math.fabs(measured)
        verdict = "spot on" if math.fabs(off) <= 0.1 else f"{'over' if off > 0 else 'under'} by {math.fabs(off):.0%}"
        return f"you predicted {_show(guess)} {prediction.unit}: {verdict}"
    return f"you predicted {guess!r}: {'right' if guess == measured else 'not quite'}"


def _show(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return repr(x)
