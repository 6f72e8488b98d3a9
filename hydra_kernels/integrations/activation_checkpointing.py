"""Activation checkpointing of a transformers decoder that works in eval() mode.

transformers' own mechanism (`activation_checkpointing_enable` / `gradient_checkpointing_enable`) checkpoints a
decoder layer only when `layer.training` is True. PPO runs its models in eval() mode (old and new log-probs
must come from the same function), so there it silently does nothing. Here every decoder layer (each
outermost `transformers.modeling_layers.GradientCheckpointingLayer`) gets an instance-level `forward` that
runs the layer under `torch.utils.checkpoint.checkpoint` whenever grad mode is on, whatever the module's mode:

- under no_grad / inference_mode (generation, scoring, evaluation) the layer runs as before, untouched;
- a forward that is given a KV cache (as a keyword or positionally: GPT-2 passes it positionally) runs as
  before too, with a warning (a recomputation would write the cache twice; transformers instead drops the
  cache). Note that a plain `model(...)` call creates a cache unless given use_cache=False; the rlhf
  pipeline's trained forwards pass use_cache=False;
- the RNG state is preserved across recomputation (dropout, where a model trains with it, is replayed).
- use_reentrant=True (the older autograd.Function implementation) passes keyword arguments through a closure,
  so only positional tensors (the hidden states) carry gradient; since the embeddings are frozen, their output is
  made to require grad (transformers' enable_input_require_grads), else nothing would back-propagate.

The checkpointed function is bound to the stream layout of the forward (nn.bind_streams: a closure that
re-enters it), so a recomputation runs the layout of the forward that built the graph, also after the streams()
context has exited and other forwards with other layouts have run. The wrapper is a bound method in the layer's
__dict__: state_dict keys do not change and copy.deepcopy rebinds it to the copy.
"""
from __future__ import annotations

import functools
import inspect
import types
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hydra_kernels.nn.streams import bind_streams

__all__ = ["enable_activation_checkpointing", "disable_activation_checkpointing", "activation_checkpointing_enabled",
           "checkpointable_layers"]

_FLAG = "_hydra_activation_checkpointing"                 # on a layer: True; its value of use_reentrant beside it
_REENTRANT = "_hydra_activation_checkpointing_reentrant"
_INPUT_HOOK = "_hydra_activation_checkpointing_input_hook"   # on the model: we turned on input require-grads
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")   # "cache": transformers >= 5.24


def checkpointable_layers(model: nn.Module) -> list[nn.Module]:
    """The outermost decoder layers of `model` (GradientCheckpointingLayer instances), in module order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:                                    # transformers < 4.52
        GradientCheckpointingLayer = None
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if GradientCheckpointingLayer is not None and isinstance(child, GradientCheckpointingLayer):
                found.append(child)                        # nested checkpointable layers stay inside this one
            else:
                visit(child)
    visit(model)
    return found


@functools.lru_cache(maxsize=None)
def _cache_arg_positions(cls: type) -> tuple[int, ...]:
    """Indices into forward's positional args (self excluded) of its KV-cache parameters: some models pass the
    cache positionally (GPT2Model calls block(hidden_states, past_key_values, ...))."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return ()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return tuple(i for i, p in enumerate(positional) if p.name in _CACHE_KWARGS)


def _given_kv_cache(layer: nn.Module, args: tuple, kwargs: dict) -> bool:
    return (any(kwargs.get(k) is not None for k in _CACHE_KWARGS)
            or any(i < len(args) and args[i] is not None for i in _cache_arg_positions(type(layer))))


def _checkpointed_forward(self, *args, **kwargs):
    plain = type(self).forward                             # the class's forward (transformers' wrapper included)
    if not torch.is_grad_enabled() or (getattr(self, "gradient_checkpointing", False) and self.training):
        return plain(self, *args, **kwargs)                # no grad, or transformers checkpoints it already
    if _given_kv_cache(self, args, kwargs):
        warnings.warn(f"activation checkpointing: {type(self).__name__} was given a KV cache under grad and runs "
                      "without checkpointing (pass use_cache=False to checkpoint it)", UserWarning, stacklevel=2)
        return plain(self, *args, **kwargs)
    if self.__dict__.get(_REENTRANT, False):
        return checkpoint(bind_streams(functools.partial(plain, self, **kwargs)), *args, use_reentrant=True)
    return checkpoint(bind_streams(plain), self, *args, use_reentrant=False, **kwargs)


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> int:
    """Recompute every decoder layer's activations in backward instead of storing them (any module mode).

    Idempotent (a second call sets use_reentrant); returns the number of layers checkpointed. Raises ValueError
    when `model` has no decoder layers transformers marks as checkpointable.
    """
    if not isinstance(use_reentrant, bool):
        raise ValueError(f"use_reentrant: must be a bool, got {use_reentrant!r}")
    layers = checkpointable_layers(model)
    if not layers:
        raise ValueError(f"model.activation_checkpointing: {type(model).__name__} has no decoder layers to "
                         "checkpoint (transformers' GradientCheckpointingLayer; transformers >= 4.52)")
    for layer in layers:
        layer.forward = types.MethodType(_checkpointed_forward, layer)
        setattr(layer, _FLAG, True)
        setattr(layer, _REENTRANT, use_reentrant)
    if use_reentrant and getattr(model, "_require_grads_hook", None) is None \
            and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        setattr(model, _INPUT_HOOK, True)
    return len(layers)


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Undo enable_activation_checkpointing (a no-op where it was never enabled)."""
    for module in model.modules():
        if module.__dict__.pop(_FLAG, False):
            module.__dict__.pop("forward", None)
            module.__dict__.pop(_REENTRANT, None)
    if model.__dict__.pop(_INPUT_HOOK, False):
        model.disable_input_require_grads()


def activation_checkpointing_enabled(model: nn.Module) -> bool:
    """True when enable_activation_checkpointing is in effect on any layer of `model`."""
    return any(module.__dict__.get(_FLAG, False) for module in model.modules())
