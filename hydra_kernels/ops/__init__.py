"""Functional ops: autograd-aware, backend-dispatching, registered with torch.library; and the argument checks
the layers above share (check_lora_args for LoRA settings, plain_eager for data-dependent checks)."""
from hydra_kernels.kernels.kl import KL_ESTIMATORS, sampled_kl
from hydra_kernels.ops._checks import check_lora_args, plain_eager
from hydra_kernels.ops.backend import choose_backend
from hydra_kernels.ops.linear_logprobs import linear_logprobs
from hydra_kernels.ops.logprobs import logprobs_and_kl, token_logprobs
from hydra_kernels.ops.lora_linear import lora_linear

__all__ = ["lora_linear", "token_logprobs", "logprobs_and_kl", "linear_logprobs", "choose_backend", "KL_ESTIMATORS",
           "sampled_kl", "check_lora_args", "plain_eager"]
