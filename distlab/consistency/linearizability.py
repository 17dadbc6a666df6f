"""A linearizability checker that searches for a linearization (Wing & Gong 1993, pruned as Lowe 2017 does).

A history is linearizable (Herlihy & Wing 1990) when its operations can be put in one order that a single
register would have produced, each taking effect at an instant between its invoke and its complete. The
checker looks for that order instead of testing necessary conditions (checker.py does that, and trusts the
versions the store reports): here only values count, so a store that lies about versions is still caught.

- Per key: a key-value store is linearizable iff each key's history is (linearizability is *local*,
  Herlihy & Wing §3.1), so each key is searched alone — the cost is exponential in one key's concurrency,
  not in the whole history's length.
- The search (Wing & Gong): walk the events in time order; at a call, try to take that operation next
  (a read must return the register's current value); at a return whose operation was not taken yet,
  backtrack. Lowe's memoisation (used by Knossos and Porcupine): a (set of operations taken, register
  value) pair already explored is never explored again, which turns many exponential cases polynomial.
- Unknown outcomes: a write that timed out may or may not have happened. It never returns (its complete
  is +inf), so the search may take it anywhere after its invoke — or after everything else, where it
  changes nothing. A read that failed returned no value and constrains nothing: leave it out.
- A bound: after `max_steps` tries the answer is "unknown", never a silent guess.

Worst case, n concurrent operations give n! orders (the problem is NP-complete: Gibbons & Korach 1997);
memoisation bounds the work by 2^n · (distinct values). With one key of modest concurrency it is fast.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from .store import Op

LINEARIZABLE, NOT_LINEARIZABLE, UNKNOWN = "linearizable", "not linearizable", "unknown"


@dataclass
class KeyVerdict:
    """One key's answer: the order found, or the smallest failing prefix and the op it cannot place."""

    key: str
    result: str
    order: list[Op] = field(default_factory=list)  # a linearization (when linearizable)
    steps: int = 0  # operations tried
    prefix: list[Op] = field(default_factory=list)  # the shortest failing prefix of the history, by completion
    culprit: Op | None = None  # the last operation of that prefix: with it, no order exists
    explanation: str = ""


@dataclass
class Verdict:
    """The whole history's answer: linearizable iff every key is; `keys` holds each key's search."""

    result: str
    keys: dict[str, KeyVerdict]

    @property
    def ok(self) -> bool:
        return self.result == LINEARIZABLE

    @property
    def steps(self) -> int:
        return sum(k.steps for k in self.keys.values())

    def failures(self) -> list[KeyVerdict]:
        return [k for k in self.keys.values() if k.result != LINEARIZABLE]

    def __str__(self) -> str:
        lines = [f"{self.result} ({len(self.keys)} keys, {self.steps} steps)"]
        lines += [f"  {k.key}: {k.explanation}" for k in self.failures()]
        return "\n".join(lines)


def _hashable(value):
    """Register values are JSON: lists and dicts become tuples so that (taken, value) can be memoised."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _step(state, op: Op):
    """The register's answer: (legal, next state). A read is legal iff it returned the current value."""
    if op.kind == "write":
        return True, _hashable(op.value)
    return _hashable(op.value) == state, state


def _events(ops: list[Op]) -> list[tuple[float, int, int]]:
    """(time, 0 = call / 1 = return, op index), sorted; at equal times calls come first (they overlap)."""
    found = [(op.invoke, 0, i) for i, op in enumerate(ops)]
    found += [(op.complete, 1, i) for i, op in enumerate(ops) if op.complete != math.inf]
    return sorted(found)


def search(ops: list[Op], initial=None, max_steps: int = 200_000) -> tuple[str, list[Op], int]:
    """Wing & Gong's search with memoisation over one register's history: (result, order found, steps)."""
    events = _events(ops)
    must = (1 << len(ops)) - 1  # every op that returned must be taken; pending ones need not be
    for i, op in enumerate(ops):
        if op.complete == math.inf:
            must &= ~(1 << i)
    state, taken, stack, seen, steps = _hashable(initial), 0, [], set(), 0
    position = 0  # index into events of the next event to look at
    while True:
        if taken & must == must:
            return LINEARIZABLE, [ops[i] for i, _, _ in stack], steps
        while position < len(events) and (taken >> events[position][2]) & 1:
            position += 1  # skip events of operations already taken
        if position < len(events) and events[position][1] == 0:  # a call: try this op next
            i = events[position][2]
            steps += 1
            if steps > max_steps:
                return UNKNOWN, [ops[j] for j, _, _ in stack], steps
            legal, after = _step(state, ops[i])
            if legal and (taken | 1 << i, after) not in seen:
                seen.add((taken | 1 << i, after))
                stack.append((i, state, position))
                state, taken, position = after, taken | 1 << i, 0
                continue
            position += 1
            continue
        # a return of an op not taken (or the end): the ops taken so far cannot be extended; undo the last
        if not stack:
            return NOT_LINEARIZABLE, [], steps
        i, state, position = stack.pop()
        taken &= ~(1 << i)
        position += 1


def _prefix(ops: list[Op], cut: float) -> list[Op]:
    """The history as it stood at time `cut`: ops that began by then; those not answered by then are pending."""
    return [op if op.complete <= cut else _pending(op) for op in ops if op.invoke <= cut
            and (op.kind == "write" or op.complete <= cut)]


def _pending(op: Op) -> Op:
    return Op(op.kind, op.rank, op.key, op.value, op.version, op.invoke, math.inf)


def _smallest_failing_prefix(ops: list[Op], initial, max_steps: int) -> tuple[list[Op], Op]:
    """Linearizability is prefix-closed, so a binary search over completion times finds the first return
    after which no order exists; that op is the culprit."""
    returns = sorted((op for op in ops if op.complete != math.inf), key=lambda op: op.complete)
    low, high = 0, len(returns) - 1  # the prefix up to returns[high] fails
    while low < high:
        middle = (low + high) // 2
        if search(_prefix(ops, returns[middle].complete), initial, max_steps)[0] == NOT_LINEARIZABLE:
            high = middle
        else:
            low = middle + 1
    culprit = returns[high]
    return sorted(_prefix(ops, culprit.complete), key=lambda op: op.invoke), culprit


def _describe(op: Op) -> str:
    end = "never answered" if op.complete == math.inf else f"{op.complete:.6g}"
    return f"{op.kind} {op.key}={op.value!r} by rank {op.rank} [{op.invoke:.6g}, {end}]"


def check_key(key: str, ops: list[Op], initial=None, max_steps: int = 200_000) -> KeyVerdict:
    """One key's verdict, with the failing prefix explained when there is no linearization."""
    result, order, steps = search(ops, initial, max_steps)
    if result == LINEARIZABLE:
        return KeyVerdict(key, result, order, steps, explanation=f"{len(ops)} operations linearized")
    if result == UNKNOWN:
        return KeyVerdict(key, result, order, steps, explanation=f"gave up after {max_steps} steps "
                          f"({len(ops)} operations): raise max_steps or check a shorter history")
    prefix, culprit = _smallest_failing_prefix(ops, initial, max_steps)
    return KeyVerdict(key, result, [], steps, prefix, culprit, explanation=(
        f"no order of the first {len(prefix)} operations explains {_describe(culprit)}; "
        "those operations: " + "; ".join(_describe(op) for op in prefix)))


def usable(ops: list[Op]) -> list[Op]:
    """The operations the checker reads: answered ones, and writes of unknown outcome as pending."""
    return [op if op.outcome == "ok" else _pending(op) for op in ops
            if op.outcome == "ok" or (op.outcome == "unknown" and op.kind == "write")]


def check(ops: list[Op], initial=None, max_steps: int = 200_000) -> Verdict:
    """Is the key-value history linearizable? Each key searched alone; `initial` is every key's start value."""
    by_key = defaultdict(list)
    for op in usable(ops):
        by_key[op.key].append(op)
    keys = {key: check_key(key, key_ops, initial, max_steps) for key, key_ops in sorted(by_key.items())}
    results = {k.result for k in keys.values()}
    overall = NOT_LINEARIZABLE if NOT_LINEARIZABLE in results else UNKNOWN if UNKNOWN in results else LINEARIZABLE
    return Verdict(overall, keys)
