"""Mixture of experts and expert parallelism: E copies of the tiny GPT's MLP, a router that sends each token
to its top k, and the experts placed on different ranks.

The router (Shazeer et al., 2017; GShard, Lepikhin et al., 2020, https://arxiv.org/abs/2006.16668; Switch
Transformer, Fedus et al., 2021, https://arxiv.org/abs/2101.03961) scores every token against every expert;
each token goes to its k best. An expert takes at most C = ceil(capacity_factor · tokens · k / E) tokens
per group, first choices first, then second choices, each in token order; the rest are dropped (the
residual connection carries them unchanged). Switch's auxiliary loss E · Σ_e f_e · P_e (f_e: share of
the assignments expert e received, P_e: its mean router probability) is 1 when balanced and pushes
the router towards it.

Expert parallelism: each rank holds E/N experts and its own tokens (one group). It fills an (E, C, d)
buffer, and one all_to_all_single sends rank j the rows of rank j's experts; the experts run; a second
all-to-all brings the outputs home. Each moves (N-1)/N · E·C·d·4 bytes per rank; backward, two more.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .. import gpt
from ..ranks import world_sizes
from .context_parallel import AllToAll, Traffic


def capacity(tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert in one group: ceil(capacity_factor · tokens · k / E)."""
    return max(1, math.ceil(capacity_factor * tokens * top_k / n_experts))


def assign_slots(choices: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """choices (tokens, k) of expert ids -> slot (tokens, k) in that expert's buffer, -1 when dropped.

    Priority: every token's first choice before any second choice; within a choice, token order."""
    slots = torch.full_like(choices, -1)
    filled = torch.zeros(n_experts, dtype=torch.long, device=choices.device)
    for j in range(choices.size(1)):
        expert = choices[:, j]
        one_hot = nn.functional.one_hot(expert, n_experts)
        rank_in_expert = (one_hot.cumsum(0) - 1).gather(1, expert[:, None])[:, 0] + filled[expert]
        slots[:, j] = torch.where(rank_in_expert < capacity, rank_in_expert, -1)
        filled += one_hot.sum(0)
    return slots


@dataclass
class Routing:
    """One group's routing: the chosen experts, their gates, the slots (-1: dropped), the capacity."""

    choices: torch.Tensor  # (tokens, k) expert ids
    gates: torch.Tensor  # (tokens, k) router probabilities of those experts
    slots: torch.Tensor  # (tokens, k)
    capacity: int
    aux_loss: torch.Tensor

    def tokens_per_expert(self, n_experts: int) -> torch.Tensor:
        """How many assignments each expert received (before the capacity cut)."""
        return torch.bincount(self.choices.reshape(-1), minlength=n_experts)

    def dropped(self) -> int:
        return int((self.slots < 0).sum())


def route(router: nn.Linear, tokens: torch.Tensor, top_k: int, capacity_factor: float) -> Routing:
    """Top-k routing of one group of tokens (tokens, d), its slots and Switch's load-balancing loss."""
    n_experts = router.out_features
    probs = router(tokens).softmax(dim=-1)
    gates, choices = probs.topk(top_k, dim=-1)
    cap = capacity(tokens.size(0), n_experts, top_k, capacity_factor)
    share = torch.bincount(choices.reshape(-1), minlength=n_experts).to(probs.dtype) / choices.numel()
    aux = n_experts * (share * probs.mean(dim=0)).sum()
    return Routing(choices, gates, assign_slots(choices, n_experts, cap), cap, aux)


def dispatch(tokens: torch.Tensor, routing: Routing, n_experts: int) -> torch.Tensor:
    """The (E, C, d) buffer: row [e, s] holds the token routed to expert e's slot s (zeros where empty)."""
    buffer = tokens.new_zeros(n_experts * routing.capacity, tokens.size(-1))
    kept = routing.slots >= 0
    token_of = torch.arange(tokens.size(0), device=tokens.device)[:, None].expand_as(routing.slots)
    rows = routing.choices[kept] * routing.capacity + routing.slots[kept]
    buffer = buffer.index_put((rows,), tokens[token_of[kept]])
    return buffer.view(n_experts, routing.capacity, -1)


def combine(outputs: torch.Tensor, routing: Routing, n_tokens: int) -> torch.Tensor:
    """Each token's output: Σ over its kept choices of gate · expert output (zero if every choice was dropped)."""
    kept = routing.slots >= 0
    flat = outputs.reshape(-1, outputs.size(-1))
    rows = routing.choices[kept] * routing.capacity + routing.slots[kept]
    token_of = torch.arange(n_tokens, device=outputs.device)[:, None].expand_as(routing.slots)[kept]
    weighted = flat[rows] * routing.gates[kept][:, None]
    return outputs.new_zeros(n_tokens, outputs.size(-1)).index_add(0, token_of, weighted)


class MoE(nn.Module):
    """In place of gpt.MLP: a router and E MLPs; tokens split into `groups` groups, each with its own
    capacity (the one-process twin of expert parallelism over `groups` ranks). After a forward,
    `.aux_loss` holds the load-balancing loss and `.last` the routing of each group."""

    def __init__(self, cfg: gpt.GPTConfig, n_experts: int = 4, top_k: int = 1, capacity_factor: float = 1.25,
                 groups: int = 1):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in 1..n_experts={n_experts}, got {top_k}")
        self.router = nn.Linear(cfg.d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(gpt.MLP(cfg) for _ in range(n_experts))
        self.top_k, self.capacity_factor, self.groups = top_k, capacity_factor, groups
        self.aux_loss, self.last = torch.zeros(()), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.size(-1))
        outs, self.last = [], []
        for group in tokens.chunk(self.groups):
            routing = route(self.router, group, self.top_k, self.capacity_factor)
            buffer = dispatch(group, routing, len(self.experts))
            done = torch.stack([expert(buffer[e]) for e, expert in enumerate(self.experts)])
            outs.append(combine(done, routing, group.size(0)))
            self.last.append(routing)
        self.aux_loss = torch.stack([r.aux_loss for r in self.last]).mean()
        return torch.cat(outs).view_as(x)


def moe_gpt(cfg: gpt.GPTConfig | None = None, seed: int = 0, **moe) -> nn.Sequential:
    """The tiny GPT with every block's MLP replaced by an MoE (same seed, same dense weights elsewhere)."""
    cfg = cfg or gpt.GPTConfig()
    model = gpt.gpt(cfg, seed)
    for layer in model:
        if isinstance(layer, gpt.Block):
            layer.mlp = MoE(cfg, **moe)
    return model


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def train_moe(steps: int = 40, lr: float = 0.5, aux_weight: float = 0.01, batch_size: int = 16, seed: int = 0,
              cfg: gpt.GPTConfig | None = None, **moe) -> dict:
    """Train the MoE GPT in this process: loss per step and, per step, the assignments each expert of the
    first MoE layer received (the load the auxiliary loss balances)."""
    cfg = cfg or gpt.GPTConfig(n_layer=2)
    model = moe_gpt(cfg, seed, **moe)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    data, losses, loads = gpt.batches(batch_size, cfg.block_size, seed), [], []
    for _ in range(steps):
        x, y = next(data)
        optimizer.zero_grad()
        loss = gpt.lm_loss(model(x), y)
        layers = moe_layers(model)
        (loss + aux_weight * sum(m.aux_loss for m in layers)).backward()
        optimizer.step()
        losses.append(loss.item())
        first = layers[0]
        loads.append(sum(r.tokens_per_expert(len(first.experts)) for r in first.last).tolist())
    return dict(losses=losses, loads=loads, model=model)


@torch.no_grad()
def first_layer_tokens(model: nn.Sequential, batch_size: int = 16, seed: int = 1) -> torch.Tensor:
    """What the first block's MoE receives for a fresh batch: (tokens, d), after attention and ln2."""
    x, _ = next(gpt.batches(batch_size, model[0].pos.num_embeddings, seed))
    hidden = model[0](x)
    hidden = hidden + model[1].attn(model[1].ln1(hidden))
    return model[1].ln2(hidden).reshape(-1, hidden.size(-1))


@torch.no_grad()
def dropped_by_capacity(model: nn.Sequential, factors: tuple[float, ...], batch_size: int = 16, seed: int = 1) -> dict:
    """Fraction of token assignments dropped in the first MoE layer at each capacity factor, same batch."""
    layer, tokens = moe_layers(model)[0], first_layer_tokens(model, batch_size, seed)
    out = {}
    for factor in factors:
        routing = route(layer.router, tokens, layer.top_k, factor)
        out[factor] = routing.dropped() / routing.slots.numel()
    return out


# -- expert parallelism: experts on ranks, tokens moved by all-to-all -----------------------------------------

class ExpertParallelMoE(nn.Module):
    """The same MoE with this rank holding experts [rank·E/N, (rank+1)·E/N) and one group of tokens: its own."""

    def __init__(self, moe: MoE, rank: int, world_size: int, traffic: Traffic | None = None):
        super().__init__()
        n_experts = len(moe.experts)
        if n_experts % world_size:
            raise ValueError(f"world_size={world_size} must divide the number of experts ({n_experts})")
        self.n_experts, self.world_size, self.traffic = n_experts, world_size, traffic
        self.router = copy.deepcopy(moe.router)
        per_rank = n_experts // world_size
        self.experts = nn.ModuleList(copy.deepcopy(moe.experts[rank * per_rank + e]) for e in range(per_rank))
        self.top_k, self.capacity_factor = moe.top_k, moe.capacity_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.size(-1))
        self.routing = route(self.router, tokens, self.top_k, self.capacity_factor)
        buffer = dispatch(tokens, self.routing, self.n_experts)  # (E, C, d)
        n, per_rank, cap, d = self.world_size, len(self.experts), self.routing.capacity, tokens.size(-1)
        arrived = AllToAll.apply(buffer.view(n, per_rank, cap, d), self.traffic)  # [i]: rank i's tokens for mine
        done = torch.stack([expert(arrived[:, e]) for e, expert in enumerate(self.experts)], dim=1)
        home = AllToAll.apply(done, self.traffic).reshape(self.n_experts, cap, d)
        self.aux_loss = self.routing.aux_loss
        return combine(home, self.routing, tokens.size(0)).view_as(x)


def predicted_all_to_all_bytes(world_size: int, n_experts: int, cap: int, d_model: int, element: int = 4) -> int:
    """Bytes one rank sends in one all-to-all of the (E, C, d) buffer: all but its own 1/N."""
    return (world_size - 1) * n_experts * cap * d_model * element // world_size


def moe_setup(batch: int = 8, seq_len: int = 32, seed: int = 0, **moe) -> tuple[MoE, torch.Tensor]:
    """An MoE layer of the tiny GPT's width and its input (batch, seq_len, d)."""
    cfg = gpt.GPTConfig(block_size=seq_len)
    torch.manual_seed(seed)
    layer = MoE(cfg, **moe)
    x = torch.randn(batch, seq_len, cfg.d_model, generator=torch.Generator().manual_seed(seed + 1))
    return layer, x


def moe_reference(world_size: int, batch: int = 8, seq_len: int = 32, seed: int = 0, **moe) -> dict:
    """One process, tokens grouped as the ranks hold them: output, input gradient, parameter gradients."""
    layer, x = moe_setup(batch, seq_len, seed, groups=world_size, **moe)
    x.requires_grad_()
    out = layer(x)
    (out.pow(2).sum() + layer.aux_loss).backward()
    return dict(out=out.detach(), dx=x.grad, grads={n: p.grad for n, p in layer.named_parameters()},
                dropped=sum(r.dropped() for r in layer.last))


@world_sizes(lambda n, batch=8, n_experts=4, **_: n_experts % n == 0 and batch % n == 0,
             "each rank holds E/N experts (4 by default) and a 1/N share of the batch")
def expert_parallel_step(ctx, batch: int = 8, seq_len: int = 32, seed: int = 0, **moe) -> dict:
    """Forward and backward of the expert-parallel MoE on this rank's share of the batch; the router's
    gradient summed over ranks, each expert's gradient left on its owner; loss as in moe_reference
    (the aux loss of the N groups averaged)."""
    layer, x = moe_setup(batch, seq_len, seed, **moe)
    traffic = Traffic()
    ep = ExpertParallelMoE(layer, ctx.rank, ctx.world_size, traffic).to(ctx.device)
    xs = x.chunk(ctx.world_size)[ctx.rank].to(ctx.device).requires_grad_()
    out = ep(xs)
    (out.pow(2).sum() + ep.aux_loss / ctx.world_size).backward()
    dist.all_reduce(ep.router.weight.grad)
    per_rank = len(ep.experts)
    grads = {f"experts.{ctx.rank * per_rank + e}.{n}": p.grad.cpu()
             for e, expert in enumerate(ep.experts) for n, p in expert.named_parameters()}
    grads["router.weight"] = ep.router.weight.grad.cpu()
    return dict(out=out.detach().cpu(), dx=xs.grad.cpu(), grads=grads, capacity=ep.routing.capacity,
                dropped=ep.routing.dropped(), sent=dict(traffic.sent), n_experts=ep.n_experts,
                tokens_per_expert=ep.routing.tokens_per_expert(ep.n_experts).tolist())
