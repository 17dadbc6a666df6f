"""Labs: the student writes the piece that matters, real ranks run it, and the check says what went wrong.

    from distlab import labs

    def my_ring_all_reduce(ctx, tensor):      # the student's code, in a cell
        ...                                    # only ctx.comm.send / recv / isend / irecv

    labs.check("02.ring_all_reduce", my_ring_all_reduce)

Each notebook ends with its lab (`lab<NN>.py` grades it; reference solutions are in `solutions/`).
`labs.expect` makes a notebook's claims check themselves; `labs.predict` asks before a measurement;
`labs.progress()` shows a student's results, `labs.gather(files)` a class's. Ranks import only
`grading` and the lab modules: nothing here pulls in plotly or ipywidgets until a figure or a widget is
asked for.
"""

from __future__ import annotations

from collections.abc import Callable

from .claims import ClaimFailed, Prediction, expect, predict
from .grading import Verdict, all_exercises, grade
from .progress import gather, progress, record

__all__ = ["ClaimFailed", "Prediction", "Verdict", "all_exercises", "check", "expect", "gather", "predict",
           "progress"]


def check(exercise: str, fn: Callable, *, figure: bool = True) -> Verdict:
    """Grade `fn` for `exercise` on real ranks, record the outcome in the progress file and return the
    verdict: shown with its figure as a cell's last line, printable elsewhere, and
    `labs.check(...).require()` raises with the diagnosis (autograded cells)."""
    verdict = grade(exercise, fn)
    record(verdict)
    if not figure:
        verdict.figure = None
    return verdict
