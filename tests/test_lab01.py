"""Lab 01: typical wrong gradient averages and model-parallel steps get the diagnosis that names their mistake
(the reference solutions pass in test_labs.py)."""

import pytest
import torch
import torch.nn.functional as F

from distlab.labs import grading
from distlab.labs.solutions import ref01


def sums(ctx, model):
    """all_reduce adds: the sum of the ranks' gradients, never divided."""
    for p in model.parameters():
        ctx.comm.all_reduce(p.grad)


def divides_twice(ctx, model):
    for p in model.parameters():
        p.grad.div_(ctx.world_size)
        ctx.comm.all_reduce(p.grad)
        p.grad.div_(ctx.world_size)


def weights_only(ctx, model):
    """Averages the weight matrices and forgets the biases."""
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            ctx.comm.all_reduce(p.grad)
            p.grad.div_(ctx.world_size)


def divides_by_two(ctx, model):
    """Right on 2 ranks only."""
    for p in model.parameters():
        ctx.comm.all_reduce(p.grad)
        p.grad.div_(2)


@pytest.mark.parametrize("solution, says", [
    (sums, "rank 0: the gradient of 0.weight is 4× the big batch's: all_reduce adds"),
    (divides_twice, "divided by 4: you divided by world_size twice"),
    (weights_only, "parameter 0.bias still holds this rank's own gradient: it was not averaged"),
    (divides_by_two, "2× the big batch's: divide the sum by world_size (here 4), not by a fixed number"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_average_gets_its_diagnosis(solution, says):
    verdict = grading.grade("01.average_gradients", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)
    assert any("should be" in detail for detail in verdict.details), str(verdict)


def no_gradient_back(ctx, stage, x, y):
    """Stage 1 never sends the gradient of its input back; stage 0 never waits for one."""
    if ctx.rank == 0:
        ctx.comm.send(stage(x).detach(), 1)
        return None
    inputs = ctx.comm.recv(torch.empty(len(x), stage[0].in_features), 0).requires_grad_()
    loss = F.cross_entropy(stage(inputs), y)
    loss.backward()
    return loss


def activations_without_grad(ctx, stage, x, y):
    """Stage 1 forgets requires_grad_() on what it received, so inputs.grad stays None."""
    if ctx.rank == 0:
        return ref01.model_parallel_step(ctx, stage, x, y)
    inputs = ctx.comm.recv(torch.empty(len(x), stage[0].in_features), 0)
    loss = F.cross_entropy(stage(inputs), y)
    loss.backward()
    ctx.comm.send(inputs.grad, 0)
    return loss


def batch_and_width_swapped(ctx, stage, x, y):
    """Stage 1 receives into (64, len(x)): the width where the batch goes."""
    if ctx.rank == 0:
        return ref01.model_parallel_step(ctx, stage, x, y)
    inputs = ctx.comm.recv(torch.empty(stage[0].in_features, len(x)), 0)
    return inputs.sum()


def no_backward_on_stage_0(ctx, stage, x, y):
    """Stage 0 receives the gradient and stops there."""
    if ctx.rank == 1:
        return ref01.model_parallel_step(ctx, stage, x, y)
    out = stage(x)
    ctx.comm.send(out.detach(), 1)
    ctx.comm.recv(torch.empty_like(out), 1)
    return None


def sends_zeros_back(ctx, stage, x, y):
    if ctx.rank == 0:
        return ref01.model_parallel_step(ctx, stage, x, y)
    inputs = ctx.comm.recv(torch.empty(len(x), stage[0].in_features), 0).requires_grad_()
    loss = F.cross_entropy(stage(inputs), y)
    loss.backward()
    ctx.comm.send(torch.zeros_like(inputs), 0)
    return loss


def uses_all_reduce(ctx, stage, x, y):
    return ctx.comm.all_reduce(x)


@pytest.mark.parametrize("solution, says", [
    (no_gradient_back, "stage 0's parameter 0.weight has no gradient: it never received one"),
    (activations_without_grad, "rank 1 tried to send None. On stage 1, inputs.grad is None when the received "
                               "activations do not require a gradient"),
    (batch_and_width_swapped, "rank 1 tried to recv a (64, 24) from rank 0; what crosses the cut is stage 0's "
                              "output activations, shape (batch, 64) = (24, 64)"),
    (no_backward_on_stage_0, "it received the gradient of its output but did not backpropagate it"),
    (sends_zeros_back, "stage 0's gradient of 0.weight is all zeros"),
    (uses_all_reduce, "allows only ctx.comm.send/recv/isend/irecv, not ctx.comm.all_reduce"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_model_parallel_step_gets_its_diagnosis(solution, says):
    verdict = grading.grade("01.model_parallel_step", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_a_send_nobody_receives_is_caught_by_the_timeout(monkeypatch):
    """Stage 1 sends the gradient back, stage 0 returns without receiving it: the send waits forever."""
    monkeypatch.setattr(grading, "LAB_TIMEOUT", 3.0)

    def forgets_to_receive(ctx, stage, x, y):
        if ctx.rank == 0:
            ctx.comm.send(stage(x).detach(), 1)
            return None
        inputs = ctx.comm.recv(torch.empty(len(x), stage[0].in_features), 0).requires_grad_()
        loss = F.cross_entropy(stage(inputs), y)
        loss.backward()
        ctx.comm.send(inputs.grad, 0)
        return loss

    verdict = grading.grade("01.model_parallel_step", forgets_to_receive)
    assert verdict.status == "wrong" and "did not finish within 3 s on 2 ranks" in verdict.summary, str(verdict)
    assert "rank 1 was waiting in send (lab01.py:" in "\n".join(verdict.details), str(verdict)
    assert "called from forgets_to_receive (test_lab01.py:" in "\n".join(verdict.details)
    assert any("Every send needs a matching recv" in detail for detail in verdict.details)
