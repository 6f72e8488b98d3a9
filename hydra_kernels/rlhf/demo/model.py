"""A tiny decoder built from a config and saved as a local Hugging Face checkpoint (config + safetensors).

The demo then loads it with `from_pretrained` from that directory, the same way a user's checkpoint is loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class TinyModelConfig:
    """Shape of the demo's Llama-style decoder."""

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    max_positions: int = 32

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: need a positive int, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: must divide hidden_size={self.hidden_size}, got {self.num_heads}")


def build_tiny_model(tokenizer, config: TinyModelConfig | None = None, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized by `config`, with the tokenizer's special-token ids.

    Dropout is off (PPO's old and new log-probs must agree); embeddings are untied so the LM head is a
    plain linear layer of its own.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    c = config or TinyModelConfig()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_heads,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_positions,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False, attention_dropout=0.0,
        rms_norm_eps=1e-5, rope_theta=10000.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def save_model(model, tokenizer, path: str | os.PathLike) -> str:
    """Save model (safetensors) and tokenizer into directory `path`; returns the path."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(str(path))            # safetensors is the default format
    tokenizer.save_pretrained(str(path))
    return str(path)
