"""The per-call state HydraLinear reads: streams() frames and rounded-adapter scopes, per thread and asyncio task.

Eager forwards read a ContextVar. torch.compile cannot trace ContextVar.get, so compiled forwards read a per-thread
mirror of the frames (a threading.local, whose attribute reads Dynamo traces and guards), kept in sync by every
push and exit; where it cannot stand for every context of its thread, compiled forwards raise.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from typing import Iterable, Iterator

import torch

# Innermost frame last. Tuples, never mutated: a pushed or exited frame sets a new tuple.
_FRAMES: contextvars.ContextVar[tuple["Frame", ...]] = contextvars.ContextVar("hydra_kernels_streams", default=())
_SCOPES: contextvars.ContextVar[tuple["RoundedScope", ...]] = contextvars.ContextVar(
    "hydra_kernels_rounded_adapters", default=())

UNTRUSTED = ("streams: a compiled forward cannot tell which stream layout to run: two asyncio tasks (or contexts) "
             "of this thread are inside streams() at once, and compiled code sees one layout per thread. Run the "
             "compiled model from one task at a time, or eagerly")


class Frame:
    """One streams() call: `names` for every HydraLinear in `indices` ({layer: adapter index per stream})."""
    __slots__ = ("names", "indices", "entry", "owner", "live")

    def __init__(self, names: tuple[str, ...], indices: dict):
        self.names, self.indices = names, indices
        # What the compiled path reads: values only (strings, ints), so Dynamo's guards match a later frame of the
        # same layout over the same layers without recompiling.
        self.entry = (names, frozenset(id(layer) for layer in indices))
        self.owner = self.live = None                      # set by push: its task, its thread's live list


class _Mirror(threading.local):
    """This thread's view for compiled code: `entries` of the frames of the context that last pushed or exited
    one here (`frames`), `live` frames pushed here and not exited, `trusted`: those came from one context."""

    def __init__(self):
        self.frames: tuple[Frame, ...] = ()
        self.entries: tuple = ()
        self.live: list[Frame] = []
        self.trusted = True


_MIRROR = _Mirror()


def _owner():
    """The running asyncio task, or None outside one: frames of two tasks in one thread share the mirror."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return None
    try:
        return asyncio.current_task()
    except RuntimeError:                                   # no running event loop in this thread
        return None


def _sync(frames: tuple[Frame, ...]) -> None:
    _FRAMES.set(frames)
    _MIRROR.frames, _MIRROR.entries = frames, tuple(f.entry for f in frames)


def push(frame: Frame) -> None:
    """Put `frame` on top of this context's frames."""
    before, mirror, owner = _FRAMES.get(), _MIRROR, _owner()
    # Another context's frames are live in this thread when the mirror shows other frames than this context's,
    # or when a live frame belongs to another task (a child task inherits its parent's frames: the same tuple).
    # Frames of code outside any task wait while the event loop runs, so they conflict with none below them.
    if mirror.live and (mirror.frames is not before
                        or any(f.owner is not owner and f.owner is not None for f in mirror.live)):
        mirror.trusted = False
    frame.owner, frame.live = owner, mirror.live
    mirror.live.append(frame)
    _sync(before + (frame,))


def remove(frame: Frame) -> None:
    """Take `frame` out of this context's frames, wherever it is in the stack (exits in any order)."""
    before, mirror = _FRAMES.get(), _MIRROR
    if frame.live is not None:
        frame.live[:] = [f for f in frame.live if f is not frame]
    if not mirror.live:
        mirror.trusted = True
    elif mirror.frames is not before:
        mirror.trusted = False
    _sync(tuple(f for f in before if f is not frame))


@contextlib.contextmanager
def reentered(frames: tuple[Frame, ...]) -> Iterator[None]:
    """Run under `frames` (a snapshot of an earlier context), then restore this context's frames exactly."""
    mirror = _MIRROR
    saved = mirror.frames, mirror.entries
    token = _FRAMES.set(frames)
    mirror.frames, mirror.entries = frames, tuple(f.entry for f in frames)
    try:
        yield
    finally:
        _FRAMES.reset(token)
        mirror.frames, mirror.entries = saved


def snapshot() -> tuple[Frame, ...]:
    """This context's frames (immutable), for reentered()."""
    return _FRAMES.get()


def layer_frame(layer) -> Frame | None:
    """The innermost frame of this context that covers `layer`, or None."""
    for frame in reversed(_FRAMES.get()):
        if layer in frame.indices:
            return frame
    return None


def traced_names(layer) -> tuple[str, ...] | None:
    """The stream names of `layer` from the mirror, for code torch.compile traces (None: no frame covers it).

    Raises RuntimeError where the mirror may not be this context's (frames of two contexts live in this thread).
    """
    mirror = _MIRROR
    if not mirror.trusted:
        raise RuntimeError(UNTRUSTED)
    me = id(layer)
    for names, ids in reversed(mirror.entries):
        if me in ids:
            return names
    return None


class RoundedScope:
    """One rounded_adapters() call: 16-bit copies of the fp32 adapters of `layers`, made on first use."""
    __slots__ = ("layers", "copies")

    def __init__(self, layers: Iterable):
        self.layers = frozenset(layers)
        self.copies: dict = {}

    def operands(self, layer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = layer.lora_A, layer.lora_B
        # A new tensor has another data pointer; an in-place update bumps the version counter.
        key = (A._version, B._version, A.data_ptr(), B.data_ptr())
        held = self.copies.get((layer, dtype))
        if held is None or held[0] != key:
            held = self.copies[(layer, dtype)] = (key, A.detach().to(dtype), B.detach().to(dtype))
        return held[1], held[2]


def push_scope(scope: RoundedScope) -> None:
    _SCOPES.set(_SCOPES.get() + (scope,))


def remove_scope(scope: RoundedScope) -> None:
    _SCOPES.set(tuple(s for s in _SCOPES.get() if s is not scope))
    scope.copies.clear()                                   # also where a copied context still refers to it


def rounded_operands(layer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """layer's (lora_A, lora_B) for a no-grad forward in `dtype`: the innermost rounded_adapters scope's copies
    where one covers `layer`, else the parameters themselves (ops.lora_linear then rounds them per call)."""
    for scope in reversed(_SCOPES.get()):
        if layer in scope.layers:
            return scope.operands(layer, dtype)
    return layer.lora_A, layer.lora_B
