"""A tiny random Llama-style model and a minimal char tokenizer for the rlhf tests (no downloads)."""
from __future__ import annotations

import torch

ALPHABET = "0123456789+= "


class CharTokenizer:
    """The rlhf tokenizer contract and nothing more: one id per character, pad/eos/bos distinct."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __init__(self, alphabet: str = ALPHABET):
        self.alphabet = alphabet
        self._id = {c: i + 3 for i, c in enumerate(alphabet)}

    def __len__(self):
        return len(self.alphabet) + 3

    def encode(self, text, add_special_tokens=False):
        return [self._id[c] for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)


def tiny_model(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, attn: str = "eager"):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                      bos_token_id=2, attn_implementation=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


MODEL_ATTRIBUTES = ("model", "reference", "reward_model", "actor", "critic", "reward_head", "value_head")


def frozen_state(models) -> dict[str, torch.Tensor]:
    """Every frozen tensor a PPOModels holds (base weights, reference and reward copies, reward head), by
    "<attribute>.<name>": what no PPO step may change."""
    trainable = {id(p) for p in models.named_trainable().values()}
    out = {}
    for prefix in MODEL_ATTRIBUTES:
        m = getattr(models, prefix, None)
        if m is None:
            continue
        for name, p in m.named_parameters():
            if id(p) not in trainable:
                out[f"{prefix}.{name}"] = p
    return out
