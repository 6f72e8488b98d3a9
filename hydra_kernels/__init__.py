"""hydra_kernels: fused multi-stream LoRA and log-prob kernels for Hydra-RLHF.

One frozen base, several LoRA adapters, one forward for all of them. See README.md.
"""
from hydra_kernels import ops
from hydra_kernels.nn import HydraLinear, set_default_stream, streams
from hydra_kernels.integrations import HydraModel, patch_model, repeat_for_streams

__version__ = "0.1.0"

__all__ = ["ops", "HydraLinear", "streams", "set_default_stream", "patch_model", "HydraModel", "repeat_for_streams",
           "__version__"]
