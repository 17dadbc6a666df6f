"""Lab 11: typical wrong checkpoints get the diagnosis that names their mistake (the reference solution passes in
test_labs.py)."""

import copy
import os

import pytest
import torch

from distlab.labs import grading
from distlab.labs.solutions.ref11 import checkpoint_restore as reference


def model_only(path):
    """Saves the parameters and the random state, forgets the optimizer: momentum lost."""
    def save(step, model, optimizer):
        torch.save({"model": model.state_dict(), "step": step, "rng": torch.get_rng_state()}, path)

    def restore(model, optimizer):
        if not os.path.exists(path):
            return 0
        state = torch.load(path)
        model.load_state_dict(state["model"])
        torch.set_rng_state(state["rng"])
        return state["step"]

    return save, restore


def no_random_state(path):
    """Everything but torch's random state: other dropout masks after the restart."""
    save, restore = reference(path)

    def restore_without_rng(model, optimizer):
        rng = torch.get_rng_state()
        step = restore(model, optimizer)
        torch.set_rng_state(rng)
        return step

    return save, restore_without_rng


def next_step(path):
    """Returns the step after the saved one: a batch skipped."""
    save, restore = reference(path)

    def restore_one_on(model, optimizer):
        step = restore(model, optimizer)
        return step + 1 if step else step

    return save, restore_one_on


def straight_into_path(path):
    """Right state, but written straight into path: a crash mid-write leaves half a file."""
    _, restore = reference(path)

    def save(step, model, optimizer):
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "rng": torch.get_rng_state()}, path)

    return save, restore


def no_file_yet(path):
    """Loads without looking: the job's first start has no checkpoint to load."""
    save, _ = reference(path)

    def restore(model, optimizer):
        state = torch.load(path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        return state["step"]

    return save, restore


def rebinds_the_model(path):
    """Loads into a copy of the model: the caller's model keeps its fresh weights."""
    save, _ = reference(path)

    def restore(model, optimizer):
        if not os.path.exists(path):
            return 0
        state = torch.load(path)
        model = copy.deepcopy(model)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        return state["step"]

    return save, restore


def a_class(path):
    """Returns an object instead of the pair."""
    return object()


@pytest.mark.parametrize("solution, says", [
    (model_only, "after restore the optimizer has no momentum: its state was not saved"),
    (no_random_state, "torch's random state is not the one the run had at the save"),
    (next_step, "restore returned 6, but save was called with step=5: off by one"),
    (straight_into_path, "a save cut off halfway destroyed the previous checkpoint"),
    (no_file_yet, "before any checkpoint exists, restore raised FileNotFoundError"),
    (rebinds_the_model, "the model still has its fresh random weights"),
    (a_class, "a_class(path) should return (save, restore)"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_checkpoint_gets_its_diagnosis(solution, says):
    verdict = grading.grade("11.checkpoint_restore", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_the_check_leaves_the_callers_random_state_and_torch_save_alone():
    torch.manual_seed(7)
    before, save = torch.get_rng_state(), torch.save
    grading.grade("11.checkpoint_restore", straight_into_path)
    assert torch.equal(torch.get_rng_state(), before) and torch.save is save


def test_a_stub_is_not_attempted():
    def stub(path):
        def save(step, model, optimizer):
            raise NotImplementedError

        def restore(model, optimizer):
            if not os.path.exists(path):
                return 0
            raise NotImplementedError

        return save, restore

    assert grading.grade("11.checkpoint_restore", stub).status == "not attempted"
