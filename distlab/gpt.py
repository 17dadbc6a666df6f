"""A tiny decoder-only transformer (GPT) and the character-level text it learns from.

The model follows GPT-2 (Radford et al., 2019) in miniature: token + position embeddings, pre-norm
blocks of causal self-attention and an MLP, a final LayerNorm and a linear head. It is stored as one
flat `nn.Sequential` (embedding, blocks..., head) so that pipeline parallelism can cut it into stages
by slicing, and tensor parallelism can shard the projections of a block by name.

The text is Python's own help topics (`pydoc_data/topics.py`), present in every CPython installation:
nothing downloads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # printable ASCII: the same vocabulary everywhere
UNKNOWN = CHARS.index("?")


@dataclass
class GPTConfig:
    vocab_size: int = len(CHARS)
    block_size: int = 32  # context length in characters
    d_model: int = 64
    n_head: int = 4
    n_layer: int = 4


class Embedding(nn.Module):
    """Token embedding plus learned position embedding."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.block_size, cfg.d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))


class Attention(nn.Module):
    """Causal multi-head self-attention with separate q, k, v projections (so heads split by slicing rows).

    The number of heads is read from the projection's width: a tensor-parallel shard holding h/t heads
    runs this same code unchanged.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, width = x.shape
        return x.view(b, t, width // self.head_dim, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        t = x.size(1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2)
        return self.proj(out.reshape(*out.shape[:2], -1))


class MLP(nn.Module):
    """Position-wise feed-forward: d -> 4d -> GELU -> d."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm and the projection to vocabulary logits."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


def gpt(cfg: GPTConfig | None = None, seed: int = 0) -> nn.Sequential:
    """The model as layers: [Embedding, Block x n_layer, Head]; the same `seed` gives the same weights on
    every device (drawn on the CPU, then moved to torch's default device: ctx.device in a rank)."""
    cfg = cfg or GPTConfig()
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"d_model={cfg.d_model} must be divisible by n_head={cfg.n_head}")
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = nn.Sequential(Embedding(cfg), *[Block(cfg) for _ in range(cfg.n_layer)], Head(cfg))
    return model.to(torch.get_default_device())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def corpus(max_chars: int | None = 200_000) -> str:
    """Python's help topics (what `help('if')` shows), from the installation itself, in topic order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[name] for name in sorted(topics))[:max_chars]


def encode(text: str) -> torch.Tensor:
    """Characters to ids in CHARS; anything outside printable ASCII becomes '?'."""
    lookup = {c: i for i, c in enumerate(CHARS)}
    return torch.tensor([lookup.get(c, UNKNOWN) for c in text], dtype=torch.long, device="cpu")


def decode(ids: torch.Tensor) -> str:
    return "".join(CHARS[i] for i in ids.tolist())


def batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """Random windows of `block_size` characters and the same windows shifted by one (the targets), drawn
    on the CPU from a CPU generator (the same on every device), on torch's default device."""
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator, device="cpu")
    x = torch.stack([data[s:s + block_size] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + 1 + block_size] for s in starts.tolist()])
    return x.to(torch.get_default_device()), y.to(torch.get_default_device())


@cache
def _encoded_corpus() -> torch.Tensor:
    return encode(corpus())  # once per process: warm ranks keep it between launches


def batches(batch_size: int, block_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random batches of the corpus; the same seed draws the same batches in every process."""
    data, generator = _encoded_corpus(), torch.Generator().manual_seed(seed)
    while True:
        yield batch(data, batch_size, block_size, generator)


def train_single(steps: int = 1, lr: float = 0.0, batch_size: int = 16, seed: int = 0,
                 cfg: GPTConfig | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The reference every parallel version must match: the whole model in this process, plain SGD on
    the batches the parallel runs draw (same seed). Returns the loss of each step and the last gradients."""
    cfg = cfg or GPTConfig()
    model = gpt(cfg, seed)
    data = batches(batch_size, cfg.block_size, seed)
    optimizer, losses = torch.optim.SGD(model.parameters(), lr=lr), []
    for _ in range(steps):
        x, y = next(data)
        optimizer.zero_grad()
        loss = lm_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {n: q.grad for n, q in model.named_parameters()}
