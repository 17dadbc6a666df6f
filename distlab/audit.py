"""The device audit: catch, on a CPU-only machine, the rank code that would break on a GPU.

With `DISTLAB_AUDIT=1` (the test suite and the notebook runs set it) every rank runs its job under
`DeviceAudit`, a TorchFunctionMode, with torch.distributed's communication calls wrapped.

On a GPU the rule is simple: what a rank computes with and sends lives on `ctx.device` (the worker
makes it torch's default device, so `torch.ones(n)` lands there). On a CPU-only machine every tensor
is on the CPU, so the audit makes the job's device *distinct*: the rank gets `ctx.device = cpu:0`,
a second spelling of the CPU, and a tensor made without a device counts as made there. A tensor is
*foreign* when it was made off `ctx.device` on purpose: by a factory given `device="cpu"` (the
string: a tensor's own `.device` reads "cpu" too, so `device=x.device` is trusted), `.cpu()`,
`.to("cpu")` or `torch.from_numpy` (each remembered with where it was made), or computed from
foreign tensors only. On a GPU a tensor is also foreign when its device simply is not `ctx.device`.
The audit raises `DeviceAuditError`, naming the tensor's device, the expected device and file:line, when
- a communication call (`dist.send`, `dist.all_reduce`, ... and `ctx.comm`, which uses them) gets
  a foreign tensor: NCCL refuses it, and gloo would move host memory behind the program's back;
- an operation mixes a foreign tensor with tensors on `ctx.device` (0-dim tensors and the indices
  of `x[i]` excepted: torch moves those itself);
- a random factory draws with `device=ctx.device` from a generator that lives on the CPU: on a GPU
  torch rejects it. (Without a `device=`, a rank draws from a CPU generator on the CPU and moves the
  numbers to ctx.device, as DistributedSampler's shuffle needs: worker.JobDevice.)

Torch's own code (its RPC agent, DTensor, the pipelining schedules) places its own tensors: what it
makes and sends is not judged. Limits: the mode sees only the job's own thread (torch function modes are per thread; the
communication wrappers see every thread), so a helper thread's tensors must say their device;
`.to(ctx.device)` of a CPU tensor hands back the same tensor, so that tensor itself is cleared (a
later use of it under its old name goes unseen); `torch.device("cpu")` objects and
`with torch.device("cpu")` blocks are trusted like `x.device`; a generator made with
`device=ctx.device` cannot be told from a CPU one here, so generators are taken to live on the CPU
(data.generator's do). The launch's arguments arrive on ctx.device (worker.on_device).
"""

from __future__ import annotations

import os
import sys
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d
from torch.overrides import TorchFunctionMode
from torch.utils import _device

ENV = "DISTLAB_AUDIT"
COMMUNICATION = ("send", "recv", "isend", "irecv", "broadcast", "all_reduce", "reduce", "all_gather",
                 "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
                 "all_to_all", "all_to_all_single", "batch_isend_irecv")
RANDOM = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.bernoulli,
          torch.multinomial}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_}  # torch moves their indices
MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
HERE = os.path.dirname(os.path.abspath(__file__))
TORCH = os.path.dirname(torch.__file__)


class DeviceAuditError(RuntimeError):
    """Rank code that would break (or silently copy through host memory) on a GPU."""


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def job_device(device: torch.device) -> torch.device:
    """The device the job is told it runs on: the rank's own, or cpu:0 (the CPU, spelled apart) under the audit."""
    return torch.device("cpu", 0) if enabled() and device.type == "cpu" else device


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether a tensor on `a` is on `b`: the CPU is one device, however spelled (cpu, the audit's cpu:0)."""
    return a.type == b.type and (a.type == "cpu" or a.index is None or b.index is None or a.index == b.index)


def inside_torch() -> bool:
    """Whether the call the audit is looking at comes from torch's own code (its RPC agent, DTensor, the
    pipelining schedules): torch places its own tensors; the audit judges the code that calls torch."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(TORCH)


def caller() -> str:
    """file:line of the innermost frame outside torch and this module: the code that made the call."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith((TORCH, __file__, "<frozen")):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _tensors(args, kwargs) -> list[torch.Tensor]:
    found = []
    for value in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += [v for v in value if isinstance(v, torch.Tensor)]
    return found


class DeviceAudit(TorchFunctionMode):
    """Tags tensors made off the job's device and fails the first misuse of one (see the module's docstring).
    The tags live here, by id, each dropped when its tensor dies: the common call costs two set lookups."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.on_cpu = device, device.type == "cpu"
        self.factories = frozenset(_device._device_constructors()) | RANDOM
        self.made: dict[int, tuple[str, str]] = {}  # id of a foreign tensor -> (its device, where it was made)

    # -- what is foreign --------------------------------------------------------------------------
    def off_device(self, device) -> bool:
        """Is `device` (a string, a torch.device, or a tensor whose device it is) other than the job's?
        Under the CPU audit a tensor's own `.device` reads "cpu", so there only a "cpu" written as a string
        (or another device type) counts as foreign: `device=x.device` and `torch.device("cpu")` pass."""
        if isinstance(device, torch.Tensor):
            return self.made_off_device(device) is not None
        parsed = torch.device(device)
        if self.on_cpu:
            return parsed.type != "cpu" or (isinstance(device, str) and parsed.index is None)
        return parsed.type != self.device.type or parsed.index not in (None, self.device.index)

    def made_off_device(self, tensor: torch.Tensor):
        """(device, where) when the tensor is foreign, else None."""
        made = self.made.get(id(tensor))
        if made is None and not self.on_cpu and self.off_device(tensor.device):
            return str(tensor.device), "before the audit saw it"
        return made

    def explain(self, tensor: torch.Tensor, what: str) -> DeviceAuditError:
        device, made = self.made_off_device(tensor)
        spelled = " (the CPU, spelled apart by the audit)" if self.on_cpu else ""
        return DeviceAuditError(
            f"device audit: {what} at {caller()} got a tensor on {device} (made at {made}), but this rank's "
            f"ctx.device is {self.device}{spelled}. On a GPU this breaks: create it with device=ctx.device (the "
            "default in a rank), or .to(ctx.device).")

    # -- the mode ---------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.factories:
            return self.factory(func, args, kwargs)
        if func in MOVES:
            return self.move(func, args, kwargs)
        if self.on_cpu and not self._touches_foreign(args, kwargs):
            return func(*args, **kwargs)
        inputs = _tensors(args[:1], {}) if func in INDEXING else _tensors(args, kwargs)
        foreign = [t for t in inputs if self.made_off_device(t) is not None]
        if not foreign:
            return func(*args, **kwargs)
        mixed = [t for t in inputs if t.dim() and self.made_off_device(t) is None]
        if mixed and any(t.dim() for t in foreign):
            raise self.explain(next(t for t in foreign if t.dim()), f"{_name(func)} (mixed with tensors on "
                               "ctx.device)")
        result = func(*args, **kwargs)
        return result if mixed else self.tag(result, self.made_off_device(foreign[0]))

    def _touches_foreign(self, args, kwargs) -> bool:
        """The fast path of the CPU audit: does any argument (or a list's item) carry a tag?"""
        made = self.made
        if not made:
            return False
        for value in (*args, *kwargs.values()) if kwargs else args:
            if id(value) in made or (type(value) in (list, tuple) and any(id(v) in made for v in value)):
                return True
        return False

    def factory(self, func, args, kwargs):
        device, generator = kwargs.get("device"), kwargs.get("generator")
        if device is None and self.on_cpu and _device.CURRENT_DEVICE is None:
            return func(*args, **kwargs)  # onto the job's own device (a generator's draw too: worker.JobDevice)
        if generator is not None and device is not None and self.wrong_generator(generator.device, device):
            raise DeviceAuditError(
                f"device audit: {_name(func)} at {caller()} draws on {torch.device(device)} from a generator on "
                f"{generator.device}; on a GPU torch rejects a generator of another device. Draw with "
                f"device='cpu' from a CPU generator and move the result with .to(ctx.device).")
        target = device if device is not None else _device.CURRENT_DEVICE or "cpu"
        result = func(*args, **kwargs)
        if self.off_device(target) and not inside_torch():
            return self.tag(result, (str(torch.device(target)), caller()))
        return result

    def wrong_generator(self, generator: torch.device, device) -> bool:
        """A draw onto `device` from a generator of another device type. Under the CPU audit generators are
        taken to live on the CPU (data.generator's do): one drawing onto ctx.device would fail on a GPU."""
        if self.on_cpu:
            return generator.type == "cpu" and torch.device(device) == self.device
        return generator.type != torch.device(device).type

    def move(self, func, args, kwargs):
        target = "cpu" if func is torch.Tensor.cpu else _target(func, args[1:], kwargs)
        result = func(*args, **kwargs)
        if target is None:  # a dtype change: it stays where it was
            return self.tag(result, self.made_off_device(args[0]))
        if self.off_device(target) and not inside_torch():  # a new tensor, even where torch hands back the same one
            made = self.made_off_device(target) if isinstance(target, torch.Tensor) else (str(target), caller())
            return self.tag(result.view_as(result) if result is args[0] else result, made)
        if result is args[0]:
            self.made.pop(id(result), None)
        return result

    def tag(self, result, made):
        if made is None:
            return result
        for tensor in result if isinstance(result, (list, tuple)) else (result,):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in self.made:
                self.made[id(tensor)] = made
                weakref.finalize(tensor, self.made.pop, id(tensor), None)
        return result

    # -- communication ----------------------------------------------------------------------------
    def check_sent(self, name: str, args, kwargs) -> None:
        tensors = list(_tensors(args, kwargs))
        if name == "batch_isend_irecv":
            tensors = [op.tensor for op in args[0]]
        for tensor in tensors:
            if self.made_off_device(tensor) is not None:
                raise self.explain(tensor, f"dist.{name}")


def _name(func) -> str:
    name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
    return name.replace("TensorBase.", "Tensor.").replace("_VariableFunctionsClass.", "torch.")


def _target(func, args, kwargs):
    """Where `.to(...)` / `.cuda(...)` moves to (a device, its spelling, or a tensor whose device it takes),
    or None when the call keeps the device."""
    if func is torch.Tensor.cuda:
        return torch.device("cuda", args[0] if args and isinstance(args[0], int) else torch.cuda.current_device())
    return next((v for v in (kwargs.get("device"), *args) if isinstance(v, (str, torch.device, torch.Tensor))), None)


def _checked(audit: DeviceAudit, name: str, call):
    def checked(*args, **kwargs):
        if not inside_torch():
            audit.check_sent(name, args, kwargs)
        return call(*args, **kwargs)

    checked.__wrapped__ = call
    return checked


@contextmanager
def auditing(device: torch.device):
    """Run the block under the audit for a job on `device`, torch.distributed's calls wrapped."""
    audit = DeviceAudit(device)
    originals = {name: getattr(dist, name) for name in COMMUNICATION if hasattr(dist, name)}
    from_numpy = torch.from_numpy  # not a torch function: the mode never sees it
    for name, call in originals.items():  # in c10d's own namespace too: P2POp accepts only its isend / irecv
        checked = _checked(audit, name, call)
        for module in (dist, c10d):
            setattr(module, name, checked)
    torch.from_numpy = lambda array: audit.tag(from_numpy(array), ("cpu", caller()))
    try:
        with audit:
            yield audit
    finally:
        torch.from_numpy = from_numpy
        for name, call in originals.items():
            for module in (dist, c10d):
                setattr(module, name, call)
