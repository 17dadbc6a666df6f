"""Lab 11: reference solutions."""

import os

import torch

from distlab.resilience.checkpoint import save_atomically


def checkpoint_restore(path):
    """save and restore for one checkpoint file holding everything the rest of training depends on:
    parameters, optimizer state, the step (the data position) and torch's random state."""
    def save(step, model, optimizer):
        save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "rng": torch.get_rng_state()}, path)  # a temporary file, then renamed into place

    def restore(model, optimizer):
        if not os.path.exists(path):
            return 0
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        return state["step"]

    return save, restore
