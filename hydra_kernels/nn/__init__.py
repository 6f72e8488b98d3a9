"""Modules: HydraLinear, the streams context (and the heads, in heads.py)."""
from hydra_kernels.nn.linear import BASE, HydraLinear
from hydra_kernels.nn.streams import hydra_layers, set_default_stream, streams

__all__ = ["HydraLinear", "streams", "set_default_stream", "hydra_layers", "BASE"]
