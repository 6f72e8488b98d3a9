"""The stream layout: which adapters the row blocks of a batch run through."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from hydra_kernels.nn.linear import BASE, HydraLinear


def hydra_layers(module: nn.Module) -> list[HydraLinear]:
    layers = [m for m in module.modules() if isinstance(m, HydraLinear)]
    if not layers:
        raise ValueError("module: contains no HydraLinear layers (patch the model first)")
    return layers


@contextmanager
def streams(module: nn.Module, *names: str) -> Iterator[tuple[str, ...]]:
    """Run every HydraLinear inside `module` with the batch split into len(names) equal row blocks.

    Block s goes through adapter names[s] ("base" = LoRA off). Feed the model a batch repeated once per
    stream (`x.repeat(len(names), ...)`). Backward and activation-checkpoint recomputation reuse the layout
    of the forward that built the graph, even after the context exits.
    """
    if not names:
        raise ValueError("names: streams(...) needs at least one stream name")
    layers = hydra_layers(module)
    for layer in layers:
        layer.stream_indices(names)          # validates every name before anything changes
    previous = [layer._stream_layout for layer in layers]
    for layer in layers:
        layer._stream_layout = tuple(names)
    try:
        yield tuple(names)
    finally:
        for layer, prev in zip(layers, previous):
            layer._stream_layout = prev


def set_default_stream(module: nn.Module, name: str) -> None:
    """The single stream every HydraLinear in `module` runs outside any `streams(...)` context."""
    layers = hydra_layers(module)
    for layer in layers:
        layer.stream_indices([name])
    for layer in layers:
        layer.default_stream = name


__all__ = ["streams", "set_default_stream", "hydra_layers", "BASE"]
