"""Functional ops: autograd-aware, backend-dispatching, registered with torch.library."""
from hydra_kernels.ops.backend import choose_backend
from hydra_kernels.ops.lora_linear import lora_linear

__all__ = ["lora_linear", "choose_backend"]
