"""Activation checkpointing of a patched model: our wrapper (integrations.activation_checkpointing) and
transformers' own with nn.checkpoint_context_fn recompute every forward under its own stream layout, with
several layouts before one backward; a layer given a KV cache (as a keyword, or positionally as GPT-2 passes
it) runs unchanged."""
import warnings

import pytest
import torch

from torch.utils.checkpoint import CheckpointError

import hydra_kernels as hk
from hydra_kernels.integrations import HydraModel
from hydra_kernels.nn import checkpoint_context_fn

from tests.integrations._models import ALPHA, R, batch, make_model, randomize_adapters


def _grads_and_cache(h, ids, mask):
    h.zero_grad(set_to_none=True)
    with hk.streams(h.model, "actor"):
        out = h.model(input_ids=ids, attention_mask=mask, use_cache=True)    # a plain call: it builds a cache
    (out.logits.float().pow(2) * torch.linspace(0, 1, out.logits.shape[-1])).mean().backward()
    return [p.grad.clone() for p in h.lora_parameters()], out.past_key_values.get_seq_length()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_layers_given_a_kv_cache_run_unchanged_with_a_warning(arch):
    h = HydraModel.from_pretrained_base(make_model(arch), r=R, alpha=ALPHA).eval()
    randomize_adapters(h.model)
    ids, mask = batch()
    plain, plain_len = _grads_and_cache(h, ids, mask)
    h.enable_activation_checkpointing()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt, ckpt_len = _grads_and_cache(h, ids, mask)
    assert any("was given a KV cache" in str(w.message) for w in caught)
    assert ckpt_len == plain_len == ids.shape[1]             # the cache holds each token once
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _several_layouts_then_backward(h, forward):
    """Grad-mode forwards under (base, actor, critic) and (critic,), a no-grad forward under (actor, base), then
    one backward outside every context: the LoRA gradients, and how many times the first HydraLinear ran."""
    ids, mask = batch()
    h.zero_grad(set_to_none=True)
    calls = []
    hook = next(iter(h.hydra_layers().values())).register_forward_hook(lambda *_: calls.append(1))
    h3 = forward(ids, mask, ("base", "actor", "critic"))
    h1 = forward(ids[:2], mask[:2], ("critic",))
    with torch.no_grad():
        forward(ids, mask, ("actor", "base"))
    (sum((s + 1) * h3[s].pow(2).mean() for s in range(3)) + h1.pow(3).mean()).backward()
    hook.remove()
    grads = [p.grad.clone() for p in h.lora_parameters()]
    assert all(g.abs().amax(dim=(1, 2)).min() > 0 for g in grads)           # both adapters get gradients
    return grads, len(calls)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_wrapper_recomputes_several_layouts_before_one_backward(use_reentrant):
    h = HydraModel.from_pretrained_base(make_model("llama"), r=R, alpha=ALPHA).eval()
    randomize_adapters(h.model)
    plain, plain_calls = _several_layouts_then_backward(h, h.forward_streams)
    h.enable_activation_checkpointing(use_reentrant=use_reentrant)
    ckpt, ckpt_calls = _several_layouts_then_backward(h, h.forward_streams)
    assert (plain_calls, ckpt_calls) == (3, 5)                               # 2 grad-mode forwards recomputed
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def _enable_transformers_checkpointing(model, **kwargs):
    """transformers' own activation checkpointing (it acts in train mode only); 5.17 names it gradient_..."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:                                                                    # pragma: no cover - transformers < 5.24
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _logits_forward(h):
    def forward(ids, mask, names):
        with hk.streams(h.model, *names):
            n = len(names)
            logits = h.model(input_ids=ids.repeat(n, 1), attention_mask=mask.repeat(n, 1), use_cache=False).logits
        return logits.view(n, *ids.shape, -1)                                 # [S, B, T, V]
    return forward


def test_transformers_checkpointing_with_the_context_fn():
    h = HydraModel.from_pretrained_base(make_model("llama"), r=R, alpha=ALPHA).train()   # dropout is 0
    randomize_adapters(h.model)
    plain, plain_calls = _several_layouts_then_backward(h, _logits_forward(h))
    _enable_transformers_checkpointing(h.model, use_reentrant=False, context_fn=checkpoint_context_fn)
    ckpt, ckpt_calls = _several_layouts_then_backward(h, _logits_forward(h))
    assert (plain_calls, ckpt_calls) == (3, 5)
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    # Without the context_fn the recomputation runs backward's layout (the default stream): it raises.
    _enable_transformers_checkpointing(h.model, use_reentrant=False)
    with pytest.raises((RuntimeError, CheckpointError), match="recomputation ran stream adapters|different metadata"):
        _several_layouts_then_backward(h, _logits_forward(h))
