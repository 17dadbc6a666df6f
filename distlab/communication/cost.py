"""The cost model of the collectives: the alpha-beta (latency-bandwidth) model (Hockney 1994; Thakur,
Rabenseifner & Gropp 2005) and the exact bytes each algorithm's schedule sends.

A collective's time is t = alpha·(messages on the critical path) + beta·(bytes on it); `sent_bytes`
counts the bytes from the schedule, chunk by chunk, so the instrumented records can be checked against
it exactly, and `fit_alpha_beta` reads alpha and beta back from measured times.
"""

from __future__ import annotations

ALGORITHMS = ("naive", "ring", "recursive_doubling")


def ring_allreduce_bytes(payload: int, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce of `payload` bytes: 2(N-1)/N * S (the model;
    `sent_bytes` counts the exact chunks)."""
    return 2 * (world_size - 1) / world_size * payload


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")


def chunk_sizes(numel: int, parts: int) -> list[int]:
    """Element counts of torch.tensor_split(numel elements, parts): the first numel % parts get one more."""
    return [numel // parts + (i < numel % parts) for i in range(parts)]


def sent_bytes(algorithm: str, numel: int, element_size: int, world_size: int, rank: int) -> int:
    """Bytes one rank sends in an all-reduce of numel elements, counted from the algorithm's schedule.

    ring: every chunk but two, twice around: 2(N-1)/N·S when N divides the size; naive: (N-1)·S at
    the root, S elsewhere; recursive doubling: S per round, plus folding in the ranks past a power of 2.
    """
    _check_algorithm(algorithm)
    n, size = int(world_size), int(numel) * element_size
    if n == 1:
        return 0
    if algorithm == "ring":
        chunks = chunk_sizes(numel, n)
        return (2 * numel - chunks[(rank + 1) % n] - chunks[(rank + 2) % n]) * element_size
    if algorithm == "naive":
        return (n - 1) * size if rank == 0 else size
    power = 1 << (n.bit_length() - 1)
    if rank >= power:
        return size  # folded in: sends its vector once, receives the result
    rounds = power.bit_length() - 1
    return (rounds + (rank < n - power)) * size


def message_rounds(algorithm: str, world_size: int) -> int:
    """Messages on the critical path of one all-reduce: what the latency term alpha is paid for."""
    _check_algorithm(algorithm)
    n = int(world_size)
    power = 1 << (n.bit_length() - 1)
    return {"ring": 2 * (n - 1), "naive": 2 * (n - 1),
            "recursive_doubling": power.bit_length() - 1 + 2 * (n > power)}[algorithm]


def critical_bytes(algorithm: str, numel: int, element_size: int, world_size: int) -> int:
    """Bytes on the critical path: the busiest rank's sends (what the bandwidth term beta is paid for)."""
    return max(sent_bytes(algorithm, numel, element_size, world_size, r) for r in range(world_size))


def fit_alpha_beta(rounds: list[int], nbytes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares alpha (s per message) and beta (s per byte) of t = alpha·rounds + beta·bytes.

    Each row is weighted by 1/t, so small messages count as much as large ones (relative error).
    """
    import numpy as np

    t = np.asarray(seconds, dtype=float)
    design = np.column_stack([rounds, nbytes]).astype(float) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    return float(alpha), float(beta)


def predict_seconds(alpha: float, beta: float, rounds: int, nbytes: int) -> float:
    return alpha * rounds + beta * nbytes


def bytes_per_payload_byte(algorithm: str, world_size: int) -> float:
    """The bandwidth coefficient: bytes on the critical path per byte of payload, e.g. 2(N-1)/N for the
    ring (counted from the schedule on a payload that N divides)."""
    numel = 64 * int(world_size)
    return critical_bytes(algorithm, numel, 1, world_size) / numel


def crossover_bytes(alpha: float, beta: float, world_size: int, slow: str = "recursive_doubling",
                    fast: str = "ring") -> float | None:
    """Payload bytes above which `fast` (fewer bytes per payload byte, more messages) beats `slow` in the
    alpha-beta model: alpha·(rounds_fast - rounds_slow) = beta·S·(coefficient_slow - coefficient_fast).
    None when `fast` never wins (its bandwidth term is no smaller); 0.0 when it always does."""
    extra_rounds = message_rounds(fast, world_size) - message_rounds(slow, world_size)
    saved = bytes_per_payload_byte(slow, world_size) - bytes_per_payload_byte(fast, world_size)
    if saved <= 0:
        return None
    return max(0.0, alpha * extra_rounds / (beta * saved))
