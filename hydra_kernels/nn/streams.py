"""The stream layout of a call: which adapters the row blocks of a batch run through, and helpers that carry it
into activation-checkpoint recomputation; the rounded-adapter scope of no-grad phases."""
from __future__ import annotations

import contextlib
import functools
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from hydra_kernels.nn import context
from hydra_kernels.nn.linear import BASE, HydraLinear


def hydra_layers(module: nn.Module) -> list[HydraLinear]:
    """Every HydraLinear inside `module` (itself included), in module order. Raises ValueError if there is none."""
    layers = [m for m in module.modules() if isinstance(m, HydraLinear)]
    if not layers:
        raise ValueError("module: contains no HydraLinear layers (patch the model first)")
    return layers


@contextmanager
def streams(module: nn.Module, *names: str) -> Iterator[tuple[str, ...]]:
    """Run every HydraLinear inside `module` with the batch split into len(names) equal row blocks.

    Block s goes through adapter names[s] ("base" = LoRA off). Feed the model a batch repeated once per
    stream (`x.repeat(len(names), ...)`). Yields `names` as a tuple.

    The layout belongs to this call: to the thread and asyncio task that entered it, not to the layers, so
    other threads and tasks run their own layouts on the same model at the same time. Contexts nest (the
    innermost one that covers a layer decides) and may exit in any order; each exit removes exactly its own
    layout. Backward reuses the layout of the forward that built the graph. Activation-checkpoint recomputation
    does too through HydraModel.enable_activation_checkpointing, or with checkpoint_context_fn / bind_streams
    for torch.utils.checkpoint. A non-reentrant recomputation under another layout raises RuntimeError; a
    reentrant checkpoint of a function not wrapped in bind_streams recomputes under backward's layout undetected.

    A torch.compile'd forward reads the layouts entered in its own thread (a per-thread mirror, guarded: one
    graph per layout). It raises while two asyncio tasks (or contexts) of that thread are inside streams() at
    once, until all of them have exited. What compiled code cannot see: a task that entered no streams() itself,
    running while another task of its thread is inside one, gets that task's layout; a context copied into
    another thread (asyncio.to_thread) carries the layout to eager forwards only. Enter streams() in the task
    and thread that run the compiled model.

    Raises ValueError (before anything changes) without names, with a name no layer of `module` has, or when
    `module` holds no HydraLinear.
    """
    if not names:
        raise ValueError("names: streams(...) needs at least one stream name")
    names = tuple(names)
    indices, by_adapters = {}, {}
    for layer in hydra_layers(module):
        idx = by_adapters.get(layer.adapters)
        if idx is None:                                    # validates every name before anything changes
            idx = by_adapters[layer.adapters] = layer.stream_indices(names)
        indices[layer] = idx
    frame = context.Frame(names, indices)
    context.push(frame)
    try:
        yield names
    finally:
        context.remove(frame)


def set_default_stream(module: nn.Module, name: str) -> None:
    """The single stream every HydraLinear in `module` runs outside any `streams(...)` context (a persistent
    setting of the layers, like `backend`). Raises ValueError for a name a layer does not have."""
    layers = hydra_layers(module)
    for layer in layers:
        layer.stream_indices([name])
    for layer in layers:
        layer.default_stream = name


def bind_streams(fn: Callable) -> Callable:
    """`fn` wrapped to run under the stream layout of this moment (this context's streams() layouts), wherever
    and whenever it is called, and to restore the caller's layout after.

    For reentrant activation checkpointing, whose recomputation calls the function again during backward, after
    the streams() context has exited: `checkpoint(bind_streams(block), x, use_reentrant=True)`. Bind it inside
    the forward (each call of checkpoint), not once ahead. Returns `fn` itself while torch.compile traces
    (compiled code replays the layout it traced).
    """
    if torch.compiler.is_compiling():
        return fn
    frames = context.snapshot()

    @functools.wraps(fn)
    def bound(*args, **kwargs):
        with context.reentered(frames):
            return fn(*args, **kwargs)
    return bound


def checkpoint_context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """A `context_fn` for non-reentrant activation checkpointing that recomputes under the forward's layout.

        torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=checkpoint_context_fn)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False,
                                                                            "context_fn": checkpoint_context_fn})

    (transformers < 5.24: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=...).) checkpoint
    calls it at each forward; it returns (a no-op context for the forward, a context that re-enters the
    forward's layout for the recomputation).
    """
    return contextlib.nullcontext(), context.reentered(context.snapshot())


@contextmanager
def rounded_adapters(module: nn.Module) -> Iterator[None]:
    """A no-grad phase (generation, scoring) that rounds fp32 adapters to the compute dtype once.

    Inside, a no-grad forward of a HydraLinear inside `module` whose fp32 adapters meet a 16-bit input uses a
    copy of the adapters rounded to the input's dtype, made on first use and reused (the same numbers the
    forward computes without the scope, which rounds on every call). The copies belong to this call (thread,
    asyncio task) and are dropped at exit, so none outlives the phase. An in-place update of the adapters (their
    version counter) or a new tensor (its data pointer) makes a new copy. Fused optimizer steps and writes through
    `.data` (`p.data.copy_(...)`) change the values without bumping the version: optimizer steps and such writes
    do not belong inside the scope. Forwards with grad and torch.compile'd forwards use the parameters as they
    are.

    Raises ValueError when `module` holds no HydraLinear.
    """
    scope = context.RoundedScope(hydra_layers(module))
    context.push_scope(scope)
    try:
        yield
    finally:
        context.remove_scope(scope)


__all__ = ["streams", "set_default_stream", "hydra_layers", "bind_streams", "checkpoint_context_fn",
           "rounded_adapters", "BASE"]
