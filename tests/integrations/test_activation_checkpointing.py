"""Review: activation checkpointing must leave a layer that is given a KV cache alone, whichever way the cache
is passed. GPT-2's model passes it to each block positionally (GPT2Block(hidden, past_key_values, ...)); a
checkpointed block then wrote the cache twice (forward and recomputation) and backward failed on a shape mismatch."""
import copy
import warnings

import pytest
import torch

import hydra_kernels as hk
from hydra_kernels.integrations import HydraModel

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
