"""Review: the SFT LM loss never trains a token from a padding position.

With a tokenizer that has no BOS (GPT-2 style bos == eos, Qwen2: bos None) an empty prompt is allowed by the
JSONL loaders, and the first completion token then has no real token before it. Left-padded in a batch with
longer rows, the token before it is padding: the loss must not "predict" it from the pad position's hidden
state (which depends on the batch composition), i.e. a row must contribute the same in any batch.
"""
import pytest
import torch

from hydra_kernels.rlhf.config import SFTConfig
from hydra_kernels.rlhf.data import SFTExample
from hydra_kernels.rlhf.sft import _demo_batch, _forward, _lm_logprob_sum
from tests.rlhf._tiny import CharTokenizer, tiny_model


class NoBosTokenizer(CharTokenizer):
    bos_token_id = None


def _lp(model, tok, examples):
    batch = _demo_batch(tok, examples, SFTConfig())
    with torch.no_grad():
        lp, n = _lm_logprob_sum(model, _forward(model, batch), batch)
    return float(lp), n


def test_empty_prompt_without_bos_is_not_trained_from_padding():
    tok = NoBosTokenizer()
    model = tiny_model(len(tok))
    empty, other = SFTExample("", "12"), SFTExample("1+1=", "2")
    lp_e, n_e = _lp(model, tok, [empty])
    lp_o, n_o = _lp(model, tok, [other])
    # Alone, the empty-prompt row has no position before its first token: '2' and EOS are predicted.
    assert (n_e, n_o) == (2, 2)
    lp_b, n_b = _lp(model, tok, [empty, other])        # `empty` is left-padded by 3
    assert n_b == n_e + n_o
    assert lp_b == pytest.approx(lp_e + lp_o, rel=1e-5, abs=1e-5)
