"""Tiny random decoders of every supported architecture (built from configs; nothing is downloaded)."""
from __future__ import annotations

import copy
import functools

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "gpt_neox")
VOCAB, PAD, EOS, BOS = 97, 0, 2, 1
R, ALPHA = 4, 8


def _config(arch: str):
    import transformers as T
    ids = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, **ids)
    if arch == "llama":
        return T.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "mistral":
        return T.MistralConfig(num_key_value_heads=2, **common)
    if arch == "qwen2":                  # q/k/v carry biases; tied embeddings as in the small Qwen2 models
        return T.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "qwen3":
        return T.Qwen3Config(num_key_value_heads=2, head_dim=8, **common)
    if arch == "opt":                    # word_embed_proj_dim < hidden: project_in/out exist (as in OPT-350m)
        c = dict(common)
        c.pop("intermediate_size")
        return T.OPTConfig(ffn_dim=64, word_embed_proj_dim=16, **c)
    if arch == "gpt2":                   # Conv1D layers, tied embeddings
        return T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **ids)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(**common)
    raise ValueError(arch)


@functools.lru_cache(maxsize=None)
def _base(arch: str, dtype: torch.dtype):
    import transformers as T
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = T.AutoModelForCausalLM.from_config(_config(arch))
        # Random non-zero biases and norms, so a layer that forgets its bias shows up.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def make_model(arch: str, dtype: torch.dtype = torch.float32):
    """A fresh copy of the arch's tiny random causal LM, eval mode."""
    return copy.deepcopy(_base(arch, dtype))


def batch(B: int = 3, T: int = 7, left_pad: bool = True, seed: int = 0):
    """(input_ids, attention_mask) with padding (left by default) of different lengths; pad tokens are PAD."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        n = min(2 * b, T - 2)
        if left_pad:
            mask[b, :n] = 0
        else:
            mask[b, T - n:] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    return ids, mask


def randomize_adapters(model, scale: float = 0.1, seed: int = 0):
    """Non-zero, distinct A and B for every adapter of every HydraLinear (so adapter streams differ)."""
    from hydra_kernels.integrations import hydra_modules
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in hydra_modules(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def merged_copy(unpatched, patched, adapter: str):
    """The unpatched model with W + scaling·B·A of `adapter` written into its weights, computed here
    independently of the library's merge code (Conv1D weights are [in, out])."""
    from hydra_kernels.integrations import hydra_modules
    ref = copy.deepcopy(unpatched)
    with torch.no_grad():
        for path, layer in hydra_modules(patched).items():
            i = layer.adapters.index(adapter)
            delta = layer.scaling * (layer.lora_B[i].double() @ layer.lora_A[i].double())
            module = ref.get_submodule(path)
            target = module.weight
            if type(module).__name__ == "Conv1D":          # weight [in, out]
                delta = delta.T
            target.copy_((target.double() + delta).to(target.dtype))
    return ref


def logits(model, ids, mask):
    """Logits of a plain (or patched, under a stream) model, with generate's position ids."""
    from hydra_kernels.integrations import position_ids_from_attention_mask
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask,
                     position_ids=position_ids_from_attention_mask(mask)).logits.float()
