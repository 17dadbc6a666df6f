"""Lab 11 · Fault tolerance: a checkpoint that makes a resumed run end bit-identical to an uninterrupted one.

The student writes `checkpointer(path) -> (save, restore)`: `save(step, model, optimizer)` and
`restore(model, optimizer) -> step`, the two methods of the library's `resilience.checkpoint.Checkpointer`
(a function returning two functions, so the exercise exports to nbgrader like every other). The check
trains a small MLP with dropout and momentum on generated data, really interrupts it (save at step 5, then a
new random state, new model, new optimizer and new save/restore, as a restarted process has), restores
and trains on. What restore brought back is compared one piece at a time with the uninterrupted run
(step, parameters, momentum, random state), then the final parameters must differ by exactly 0.0. Last,
a save is cut off halfway (torch.save writes half a file and the process "dies"): the previous checkpoint
must survive. All in-process: well under a second.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import data
from ..resilience.checkpoint import Checkpointer
from .grading import NotAttempted, Passed, Wrong, call_student, exercise, first_difference

STEPS, CRASH = 12, 5  # train 12 steps; the interrupted run saves after 5, "dies", and resumes
RESTART_SEED = 1234  # a restarted process starts from another random state
BATCH = 32


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A digits-sized MLP with dropout (so training draws random numbers) and SGD with momentum (so the
    optimizer has state): both must be in the checkpoint for the resumed run to match."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """256 generated examples of the digits' shape (64 features, 10 classes): no scikit-learn to load."""
    g = data.generator(0, 0)
    return torch.randn(256, 64, generator=g), torch.randint(10, (256,), generator=g)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, start: int, stop: int) -> list[float]:
    """Steps start..stop-1; the batches are drawn by step (data.minibatches(start=)): the step is the data position."""
    batches = data.minibatches(*dataset(), BATCH, start=start)
    losses = []
    for _ in range(start, stop):
        xb, yb = next(batches)
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def momentum(optimizer: torch.optim.Optimizer) -> list[torch.Tensor | None]:
    return [optimizer.state.get(p, {}).get("momentum_buffer") for p in optimizer.param_groups[0]["params"]]


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Everything the rest of training depends on, copied: parameters, momentum, torch's random state."""
    return {"params": copy.deepcopy(model.state_dict()), "momentum": [None if m is None else m.clone()
            for m in momentum(optimizer)], "rng": torch.get_rng_state()}


def uninterrupted() -> tuple[dict, dict, list[float]]:
    """The run to match: (its state at the crash step, its state at the end, its losses)."""
    torch.manual_seed(0)
    model, optimizer = model_and_optimizer()
    losses = train(model, optimizer, 0, CRASH)
    at_crash = snapshot(model, optimizer)
    losses += train(model, optimizer, CRASH, STEPS)
    return at_crash, snapshot(model, optimizer), losses


def largest_gap(a: list, b: list) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# -- what the check says about what restore brought back ----------------------------------------------

def _explain_step(step) -> None:
    if not isinstance(step, int):
        raise Wrong(f"restore returned {type(step).__name__}: return the step (an int) that was given to save")
    if step in (CRASH - 1, CRASH + 1):
        raise Wrong(f"restore returned {step}, but save was called with step={CRASH}: off by one. Return exactly "
                    f"the step save was given: it is the next step to run, and the data position")
    if step != CRASH:
        raise Wrong(f"restore returned {step}, but save was called with step={CRASH}")


def _explain_parameters(model: nn.Module, fresh: dict, expected: dict) -> None:
    now = model.state_dict()
    if all(torch.equal(now[k], fresh[k]) for k in now):
        raise Wrong("after restore the model still has its fresh random weights: load the saved parameters into "
                    "the model you were given (model.load_state_dict(...)); `model = ...` inside restore only "
                    "rebinds a local name")
    for name, value in now.items():
        difference = first_difference(value, expected[name], atol=0, rtol=0)
        if difference is not None:
            index, got, should = difference
            raise Wrong(f"after restore, parameter {name} differs from the run at step {CRASH}: element "
                        f"{list(index)} is {got:.6g}, should be {should:.6g}")


def _explain_momentum(optimizer: torch.optim.Optimizer, expected: list[torch.Tensor]) -> None:
    restored = momentum(optimizer)
    if all(m is None for m in restored):
        raise Wrong("after restore the optimizer has no momentum: its state was not saved, so the resumed run "
                    "starts from zero velocity and drifts away. Save optimizer.state_dict() too, and load it with "
                    "optimizer.load_state_dict(...)")
    if any(m is None or not torch.equal(m, e) for m, e in zip(restored, expected)):
        raise Wrong(f"after restore the optimizer's momentum differs from the run's at step {CRASH}: save and load "
                    "the optimizer's whole state_dict()")


def _explain_rng(expected: torch.Tensor) -> None:
    if not torch.equal(torch.get_rng_state(), expected):
        raise Wrong("after restore torch's random state is not the one the run had at the save: the resumed run "
                    "draws other dropout masks. Save torch.get_rng_state() and restore it with torch.set_rng_state")


# -- the interruptions --------------------------------------------------------------------------------

def _build(fn, path: Path) -> tuple:
    """The student's (save, restore) for `path`, made afresh as a restarted process makes them."""
    made = call_student(fn, path)
    if not (isinstance(made, tuple) and len(made) == 2 and all(map(callable, made))):
        raise Wrong(f"{getattr(fn, '__name__', 'your function')}(path) should return (save, restore): two functions, "
                    "save(step, model, optimizer) and restore(model, optimizer) -> step")
    return made


def _first_start(fn, path: Path) -> None:
    """A job's first start: nothing saved yet, restore must say 0 and leave the model alone."""
    model, optimizer = model_and_optimizer()
    fresh = copy.deepcopy(model.state_dict())
    _, restore = _build(fn, path)
    try:
        step = restore(model, optimizer)
    except NotImplementedError:
        raise NotAttempted() from None
    except Exception as error:
        raise Wrong(f"before any checkpoint exists, restore raised {type(error).__name__}: {error}. A job's first "
                    "start has nothing to resume: when the file is not there, return 0 and leave the model as "
                    "it is") from None
    if step != 0 or any(not torch.equal(v, fresh[k]) for k, v in model.state_dict().items()):
        raise Wrong(f"before any checkpoint exists, restore returned {step!r} (or changed the model): it should "
                    "return 0, the first step, and leave the model as it is")


def _interrupted(fn, path: Path, at_crash: dict) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    """Train to CRASH, save, then restart as a new process would, restore and check what came back."""
    torch.manual_seed(0)
    model, optimizer = model_and_optimizer()
    train(model, optimizer, 0, CRASH)
    started = time.perf_counter()
    save, _ = _build(fn, path)
    call_student(save, CRASH, model, optimizer)
    seconds = time.perf_counter() - started
    torch.manual_seed(RESTART_SEED)  # the crash: a new process, other weights, another random state
    model, optimizer = model_and_optimizer()
    fresh = copy.deepcopy(model.state_dict())
    _, restore = _build(fn, path)
    step = call_student(restore, model, optimizer)
    _explain_step(step)
    _explain_parameters(model, fresh, at_crash["params"])
    _explain_momentum(optimizer, at_crash["momentum"])
    _explain_rng(at_crash["rng"])
    return model, optimizer, {"save_s": seconds, "bytes": path.stat().st_size if path.exists() else 0}


class _Killed(BaseException):
    """The process died in the middle of torch.save (a BaseException: an `except Exception` does not stop it)."""


@contextmanager
def torch_save_dies_halfway() -> Iterator[list[int]]:
    """Inside: torch.save writes the first bytes of its file, then the process "dies". Yields a call counter."""
    original, calls = torch.save, []

    def dies(obj, f, *args, **kwargs):
        calls.append(1)
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as half:
                half.write(b"PK\x03\x04 half a checkpoint")
        else:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise _Killed()

    torch.save = dies
    try:
        yield calls
    finally:
        torch.save = original


def _killed_mid_save(fn, path: Path) -> None:
    """A save cut off halfway must leave the previous checkpoint (step CRASH) restorable."""
    model, optimizer = model_and_optimizer()
    save, _ = _build(fn, path)
    with torch_save_dies_halfway() as calls:
        try:
            call_student(save, CRASH + 1, model, optimizer)
        except _Killed:
            pass
    if not calls:
        raise Wrong("your save did not call torch.save, so the check cannot cut it off halfway to test that a "
                    "crash during a save keeps the previous checkpoint: write the file with torch.save")
    model, optimizer = model_and_optimizer()
    atomic = "Write to a temporary file next to it, then os.replace it onto path (atomic on POSIX): " \
             "distlab.resilience.checkpoint.save_atomically does exactly that"
    _, restore = _build(fn, path)
    try:
        step = restore(model, optimizer)
    except Exception as error:
        raise Wrong(f"a save cut off halfway destroyed the previous checkpoint: restore then raised "
                    f"{type(error).__name__}. You wrote straight into path, so a crash mid-write leaves half a "
                    "file", atomic) from None
    if step != CRASH:
        raise Wrong(f"after a save of step {CRASH + 1} was cut off halfway, restore returned {step!r} instead of the "
                    f"previous checkpoint's step {CRASH}", atomic)


def _library_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> int:
    """The size of the library's checkpoint of the same state, to set beside the student's."""
    Checkpointer(folder, rank=0, world_size=1, every=1).save(STEPS, model, optimizer)
    return sum(p.stat().st_size for p in folder.glob("*.pt"))


@exercise("11.checkpoint_restore", "Checkpoint and restore: the resumed run ends bit-identical")
def checkpoint_restore(fn) -> Passed:
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(prefix="lab11_") as folder:
        path = Path(folder) / "checkpoint.pt"
        _first_start(fn, path)
        at_crash, at_end, losses = uninterrupted()
        model, optimizer, cost = _interrupted(fn, path, at_crash)
        resumed = train(model, optimizer, CRASH, STEPS)
        final = snapshot(model, optimizer)
        params = largest_gap(list(final["params"].values()), list(at_end["params"].values()))
        velocity = largest_gap(final["momentum"], at_end["momentum"])
        if params != 0.0 or velocity != 0.0:
            step = next((s for s, (a, b) in enumerate(zip(resumed, losses[CRASH:]), CRASH) if a != b), STEPS)
            raise Wrong(f"restore brought the state back, yet the resumed run differs: first at step {step}, largest "
                        f"parameter difference {params:.3g} after {STEPS} steps. Does restore change anything else?")
        _killed_mid_save(fn, path)
        library = _library_bytes(model, optimizer, Path(folder) / "library")
    return Passed(f"interrupted after step {CRASH}, restored into fresh objects, resumed: after {STEPS} steps the "
                  "parameters and momentum equal the uninterrupted run's exactly; a save cut off halfway keeps "
                  "the previous checkpoint", {
                      "largest difference to the uninterrupted run": f"parameters {params}, momentum {velocity}",
                      "your checkpoint": f"{cost['bytes']:,} bytes, saved in {cost['save_s'] * 1e3:.1f} ms "
                                         f"(the library's Checkpointer: {library:,} bytes)"})
