"""The CUDA-graph capture of the training step, and what a CPU can check of it.

A CUDA graph records the kernels one call of the step launches, then replays them: no Python runs at a
replay. So a captured step must not

* read a tensor's value on the host (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``): the capture
  fails, or the value seen at capture is kept;
* make a shape that depends on data (``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``):
  the host must learn the size first;
* copy new data from the host (``torch.tensor(python values)``, ``.to(device)`` of a CPU tensor): the copy
  is recorded from a host buffer, not from the values of later steps;
* read a Python value that changes between steps (a learning rate as a float, the epoch number): it is
  frozen at its capture-time value.

:class:`CaptureSafetyCheck` catches the first three eagerly, on any device, naming the operation and the
line of the step that called it; :func:`check_capture_safety` runs one call under it. The engine runs the
first warm-up step of every capture under it, so a step that cannot be captured falls back to eager
steps with the reason, before anything is captured. On a CPU a host-to-device copy cannot happen; what
stands for it is a tensor made from Python data inside the step (``lift_fresh``), which is what
``torch.tensor(...)`` and ``torch.from_numpy(...)`` dispatch; copies between devices are caught on GPUs.

:class:`GraphedStep` captures one call of the step and replays it. Off CUDA (tests) the capture is
simulated, faithfully enough to catch frozen values: the capture records every operation the step
dispatches with the Python values it passed and the tensors it read from outside the step, and a replay
runs the step's Python again with those values and tensors put back, which is what the graph would
compute; a replay whose Python takes another path raises :class:`CaptureHazard`.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import traceback
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from kdlib.errors import KDLibError

__all__ = ["CaptureHazard", "CaptureSafetyCheck", "check_capture_safety", "GraphedStep", "graph_blockers",
           "live_graphs"]


class CaptureHazard(KDLibError):
    """Something in the step cannot run inside a captured CUDA graph (what, which operation, where)."""

    def __init__(self, what: str, op: str, where: str):
        self.what, self.op, self.where = what, op, where
        super().__init__(f"the training step cannot be captured in a CUDA graph: {what} ({op}) at {where}")


# -- what a graph cannot hold ------------------------------------------------------------------------------
_HOST_READS = {"_local_scalar_dense": "a tensor's value read on the host (.item(), bool(), int(), float())",
               "equal": "torch.equal, a tensor comparison answered on the host",
               "is_nonzero": "a tensor's truth value read on the host"}
_DATA_SHAPED = {"nonzero", "nonzero_numpy", "argwhere", "masked_select", "masked_scatter_backward", "_unique",
                "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount", "histc"}
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"}
_HOST_DATA = {"lift_fresh", "lift_fresh_copy"}
_COPIES = {"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize"}
_HOST_METHODS = {"tolist": "Tensor.tolist(), a read on the host", "numpy": "Tensor.numpy(), a read on the host",
                 "__array__": "a tensor turned into a numpy array on the host"}
#: frames of these files are not the step's code: the error names the first frame outside them
_LIBRARY_PARTS = (os.sep + "torch" + os.sep, os.sep + "torchvision" + os.sep, os.path.abspath(__file__),
                  os.sep + "contextlib.py", os.sep + "functools.py")


def _caller() -> str:
    """``file:line in function: code`` of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        if not any(part in frame.filename for part in _LIBRARY_PARTS):
            name = frame.filename
            try:
                name = os.path.relpath(name)
            except ValueError:  # another drive (Windows)
                pass
            return f"{name}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return "(inside torch)"


def _is_mask(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dtype in (torch.bool, torch.uint8)


def _dispatch_hazard(name: str, args, kwargs) -> Optional[str]:
    if name in _HOST_READS:
        return _HOST_READS[name]
    if name in _DATA_SHAPED or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                and isinstance(args[0], Tensor)):
        return "an output whose shape depends on the data"
    if name in _INDEXING and len(args) > 1 and any(_is_mask(i) for i in (args[1] or ())):
        return "boolean-mask indexing (its shape depends on the data)"
    if name in _HOST_DATA:
        return "a tensor made from Python data inside the step (a host-to-device copy on a GPU)"
    return None


def _devices(value: Any) -> set:
    return {leaf.device for leaf in tree_flatten(value)[0] if isinstance(leaf, Tensor)}


class _DispatchCheck(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        hazard = _dispatch_hazard(name, args, kwargs)
        if hazard:
            raise CaptureHazard(hazard, str(func), _caller())
        out = func(*args, **kwargs)
        if name in _COPIES and len(_devices(args) | _devices(out)) > 1:
            raise CaptureHazard("a copy between devices inside the step", str(func), _caller())
        return out


class _FunctionCheck(TorchFunctionMode):
    """Reads that bypass the dispatcher on a CPU (``tolist``, ``numpy``) and masked writes, which a CPU
    turns into ``masked_fill`` but a GPU into a data-dependent ``index_put``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _HOST_METHODS:
            raise CaptureHazard(_HOST_METHODS[name], f"Tensor.{name}", _caller())
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(_is_mask(i) for i in index):
                raise CaptureHazard("boolean-mask indexing (its shape depends on the data)", f"Tensor.{name}",
                                    _caller())
        return func(*args, **kwargs)


@contextlib.contextmanager
def CaptureSafetyCheck():
    """While active, anything a CUDA graph cannot hold raises :class:`CaptureHazard` (see the module)."""
    with _FunctionCheck(), _DispatchCheck():
        yield


def check_capture_safety(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` under :class:`CaptureSafetyCheck`; returns its result or raises."""
    with CaptureSafetyCheck():
        return fn(*args, **kwargs)


def graph_blockers(method: Any, teacher_logits: Any, compile: bool) -> List[str]:
    """Why the step of this run cannot be captured (empty: it can): a method that declares
    ``graph_safe = False``, a teacher-logit source that cannot run inside a graph, ``compile=true``."""
    reasons = []
    if not getattr(method, "graph_safe", True):
        reasons.append(f"method {getattr(method, 'name', '?')!r} declares graph_safe = False")
    if teacher_logits is not None and not getattr(teacher_logits, "capturable", False):
        reasons.append("the teacher-logit source cannot run inside a graph")
    if compile:
        reasons.append("compile=true (torch.compile's own CUDA graphs do not nest in a captured step)")
    return reasons


# -- the simulated capture -----------------------------------------------------------------------------
def _is_value(leaf: Any) -> bool:
    return isinstance(leaf, numbers.Number) and not isinstance(leaf, Tensor)


class _Recorder(TorchDispatchMode):
    """The capture, simulated: every operation with its Python values and the outside tensors it read."""

    def __init__(self):
        super().__init__()
        self.log: List[tuple] = []
        self.made: Dict[int, Tensor] = {}  # tensors made inside the step (kept alive: their ids stay theirs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves, spec = tree_flatten((args, kwargs or {}))
        kept = [None if isinstance(leaf, Tensor) and id(leaf) in self.made else leaf for leaf in leaves]
        self.log.append((func, spec, kept))
        out = func(*args, **(kwargs or {}))
        self.made.update((id(t), t) for t in tree_flatten(out)[0] if isinstance(t, Tensor))
        return out


class _FrozenReplay(TorchDispatchMode):
    """A replay, simulated: the step's Python runs again, every Python value an operation takes is the one
    recorded at capture and every tensor from outside the step is the one read at capture."""

    def __init__(self, log: List[tuple]):
        super().__init__()
        self.log, self.position, self.frozen = log, 0, 0
        self.made: Dict[int, Tensor] = {}

    def _diverged(self, now: str) -> CaptureHazard:
        then = str(self.log[self.position][0]) if self.position < len(self.log) else "the end of the step"
        return CaptureHazard("the step's Python took another path than at capture (a graph replays the "
                             "captured operations)", f"{now} where the capture had {then}", _caller())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves, spec = tree_flatten((args, kwargs or {}))
        if self.position >= len(self.log) or self.log[self.position][0] is not func \
                or self.log[self.position][1] != spec:
            raise self._diverged(str(func))
        _, _, kept = self.log[self.position]
        self.position += 1
        replayed = []
        for now, then in zip(leaves, kept):
            if isinstance(now, Tensor) and then is not None and now is not then and id(now) not in self.made:
                now, self.frozen = then, self.frozen + 1  # the graph reads the tensor it was captured with
            elif _is_value(then) and _is_value(now):
                self.frozen += now != then
                now = then  # a Python value is baked into the captured kernel
            replayed.append(now)
        args, kwargs = tree_unflatten(replayed, spec)
        out = func(*args, **kwargs)
        self.made.update((id(t), t) for t in tree_flatten(out)[0] if isinstance(t, Tensor))
        return out

    def finish(self) -> None:
        if self.position != len(self.log):
            raise self._diverged("the end of the step")


# -- the captured step -----------------------------------------------------------------------------------
#: every GraphedStep not yet released (weakly: the registry keeps none alive)
_LIVE: "weakref.WeakSet[GraphedStep]" = weakref.WeakSet()


def live_graphs() -> int:
    """How many captured steps (real or simulated) are alive and not released in this process."""
    return sum(1 for g in list(_LIVE) if not g.released)


class GraphedStep:
    """One call of a training step, ``step(indices, generator, ctx, sums, view_generator, step_number)``,
    captured once as a CUDA graph for a fixed batch size and replayed.

    Static inputs: the batch's dataset indices (``indices``, copied in before each replay), the training
    progress (``ctx.progress``, a float32 0-dim tensor) and the step number (for the non-finite check).
    The learning rate is the fused SGD's float32 device tensor, filled between epochs. The augmentation
    generators are registered with the graph, so each replay draws new crops and flips.

    Capture protocol (PyTorch's CUDA-graph notes): ``warmup`` steps on a side stream (cuDNN picks its
    algorithms, lazy state is allocated), the first of them under :class:`CaptureSafetyCheck`; then every
    tensor of ``state`` and every generator is restored *in place* (addresses must not change), then the
    capture. The caller has already resumed (``load_state_dict`` makes new tensors) and made one real
    step, so the momentum buffers exist (fused SGD bakes "first step" into the capture). If anything
    fails, the state is restored all the same and the exception propagates: the caller steps eagerly on.
    """

    def __init__(self, step: Callable[..., Tensor], *, state: Sequence[Tensor], sums: Any, batch_size: int,
                 device: torch.device, generators: Sequence[Optional[torch.Generator]], ctx: Any,
                 first_indices: Optional[Tensor] = None, warmup: int = 3, check: bool = True):
        self.step, self.sums, self.batch_size, self.ctx = step, sums, batch_size, ctx
        self.generator, self.view_generator = generators
        self.indices = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.step_number = torch.zeros((), dtype=torch.int64, device=device)
        self.ctx.indices = self.indices
        if first_indices is not None:  # warm up on a real batch (BatchNorm of one repeated image is odd)
            self.indices.copy_(first_indices)
        self.simulated = torch.device(device).type != "cuda"
        if hasattr(step, "cache_autocast"):
            # the autocast cache of cast weights would be freed under the graph (PyTorch's CUDA-graph
            # notes ask for it off); the casts it saves are the same numbers, so eager steps keep it off too
            step.cache_autocast = False
        self.graph: Any = None
        self.log: List[tuple] = []
        self.frozen_values = 0  # simulated replays: Python values or tensors put back to their capture-time ones
        self.released = False
        with _restored(state, [g for g in generators if g is not None], sums):
            self._warm_up(warmup, check, device)
            if self.simulated:
                recorder = _Recorder()
                with recorder:
                    self._call()
                self.log = recorder.log
        if not self.simulated:
            self._capture(device)
        _LIVE.add(self)

    def _call(self) -> Tensor:
        return self.step(self.indices, self.generator, self.ctx, self.sums, self.view_generator,
                         step_number=self.step_number)

    def _warm_up(self, steps: int, check: bool, device) -> None:
        stream = None if self.simulated else torch.cuda.Stream(device)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for i in range(steps):
                with CaptureSafetyCheck() if check and i == 0 else contextlib.nullcontext():
                    self._call()
        if stream is not None:
            torch.cuda.current_stream(device).wait_stream(stream)
            torch.cuda.synchronize(device)
        self._stream = stream

    def _capture(self, device) -> None:
        count = self.sums.count
        generators = [g for g in (self.generator, self.view_generator) if g is not None]
        states = [g.get_state() for g in generators]
        self.graph = torch.cuda.CUDAGraph()
        for g in generators:  # each replay then draws new numbers from them
            self.graph.register_generator_state(g)
        try:
            with torch.cuda.graph(self.graph, stream=self._stream):
                self._call()
        except Exception:
            self.graph = None
            torch.cuda.synchronize(device)
            for g, state in zip(generators, states):  # the eager steps that follow draw as before
                g.set_state(state)
            raise
        finally:
            self.sums.count = count  # the capture ran no arithmetic; replays count (see replay)

    def replay(self, indices: Tensor, step_number: int, progress: float) -> None:
        """One step on ``indices``: copy the static inputs in (device copies, no sync), replay."""
        if self.released:
            raise KDLibError("this captured step was released; capture a new one")
        self.indices.copy_(indices)
        self.step_number.fill_(step_number)
        if isinstance(self.ctx.progress, Tensor):
            self.ctx.progress.fill_(progress)
        if self.simulated:
            replay = _FrozenReplay(self.log)
            with replay:
                self._call()
            replay.finish()
            self.frozen_values += replay.frozen
            return
        self.graph.replay()
        self.sums.count += self.batch_size
        counter = getattr(getattr(self.step, "teacher_logits", None), "count_lookups", None)
        if counter is not None:
            counter(self.batch_size)

    def release(self) -> None:
        """Free the graph and its memory pool (after the device finished every replay)."""
        if self.graph is not None:
            torch.cuda.synchronize()
            self.graph.reset()
        self.graph, self.log, self.released = None, [], True


@contextlib.contextmanager
def _restored(state: Sequence[Tensor], generators: Sequence[torch.Generator], sums: Any):
    """Put every tensor of ``state``, every generator and the epoch sums back as they were, in place,
    when the block ends (normally or not): warm-up steps are not training."""
    saved = [t.detach().clone() for t in state]
    gen_states = [g.get_state() for g in generators]
    count = sums.count
    sum_tensors = _sum_tensors(sums)
    saved_sums = {name: t.clone() for name, t in sum_tensors.items()}
    try:
        yield
    finally:
        if any(t.is_cuda for t in state):  # warm-up work queued on a side stream finishes first
            torch.cuda.synchronize()
        with torch.no_grad():
            for t, value in zip(state, saved):
                t.copy_(value)
            for name, t in _sum_tensors(sums).items():  # terms first made by the warm-up start at 0
                t.copy_(saved_sums[name]) if name in saved_sums else t.zero_()
        sums.count = count
        for g, s in zip(generators, gen_states):
            g.set_state(s)


def _sum_tensors(sums: Any) -> Dict[str, Tensor]:
    return {"@loss": sums.loss, "@correct": sums.correct, "@first_bad": sums.first_bad, **sums.terms}
