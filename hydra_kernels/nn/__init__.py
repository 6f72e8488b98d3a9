"""Modules and call contexts: HydraLinear (linear.py); the stream layout of a call, its checkpointing helpers and
the rounded-adapter scope (streams.py), kept per thread and asyncio task (context.py)."""
from hydra_kernels.nn.linear import BASE, HydraLinear
from hydra_kernels.nn.streams import (bind_streams, checkpoint_context_fn, hydra_layers, rounded_adapters,
                                      set_default_stream, streams)

__all__ = ["HydraLinear", "streams", "set_default_stream", "hydra_layers", "bind_streams", "checkpoint_context_fn",
           "rounded_adapters", "BASE"]
