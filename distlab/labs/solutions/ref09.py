"""Lab 09: reference solutions."""

import math

import torch


def pipelined_inference(ctx, module, prompts, micro_batch, d_model):
    """Micro-batch by micro-batch: receive from the previous stage, run this stage, send on at once."""
    stage, last = ctx.rank, ctx.world_size - 1
    answers, in_flight = [], None
    for chunk in prompts.split(micro_batch):
        if stage == 0:
            x = chunk
        else:
            x = ctx.comm.recv(torch.empty(len(chunk), prompts.shape[1], d_model, device=prompts.device), stage - 1)
        y = module(x)
        if stage == last:
            answers.append(y[:, -1])
            continue
        if in_flight is not None:
            in_flight.wait()  # at most one micro-batch in flight to the next stage
        in_flight = ctx.comm.isend(y, stage + 1)
    if in_flight is not None:
        in_flight.wait()
    return torch.cat(answers) if stage == last else None


def cached_attention(q, k_new, v_new, k_cache, v_cache):
    """Append the new key and value, then the new query attends to all L + 1 positions."""
    k_cache, v_cache = torch.cat([k_cache, k_new[:, None]], dim=1), torch.cat([v_cache, v_new[:, None]], dim=1)
    scores = (k_cache @ q[:, :, None]).squeeze(-1) / math.sqrt(q.size(-1))  # (heads, L + 1)
    return (scores.softmax(dim=-1)[:, None] @ v_cache).squeeze(1), k_cache, v_cache
