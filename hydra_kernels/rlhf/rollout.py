"""Rollouts: sampling responses from a policy with a KV cache.

Prompts come in left-padded ([B, P] ids and mask); responses go out right-padded ([B, R]): a row stops at its
first EOS (kept, it is the last response token) and is padded after it. Sampling uses an explicit
torch.Generator, so a rollout depends only on the weights and the seed it is given (resume-safe).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from hydra_kernels.integrations import cache_kwarg
from hydra_kernels.integrations.fsdp import gathered_call, sharded_root
from hydra_kernels.nn.streams import rounded_adapters, streams
from hydra_kernels.rlhf.data import position_ids_from_mask, tokenize_prompts
from hydra_kernels.rlhf.models import last_logits


@dataclass
class Rollout:
    """prompt_ids / prompt_mask [B, P] (left-padded); response_ids / response_mask [B, R] (right-padded:
    mask 1 on response tokens up to and including EOS); ended [B]: the response emitted EOS.

    What generate recorded while sampling (None unless asked for), fp32 [B, R], 0 off the response mask: the
    sampling policy's log-probs of the response tokens and its entropy (both of the full tempered distribution,
    top-p or not), and the values of a value head on the policy's own hidden states."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], 1)

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids_from_mask(self.attention_mask)

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(*(None if (t := getattr(self, f.name)) is None else t[index] for f in fields(self)))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches top_p (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """One token per row from fp32 logits [B, V]; temperature 0 = greedy. generator: one for the batch, or one
    per row (B of them), so that a row's tokens do not depend on which other rows share its batch."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = top_p_filter(logits / temperature, top_p).softmax(-1)
    if isinstance(generator, (list, tuple)):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"generator: {len(generator)} generators for {probs.shape[0]} rows")
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StaticDecoding:
    """A fixed-size KV cache (transformers' StaticCache) and a torch.compiled decoding step for one policy and
    one (batch, length): every step has the same shapes, so the compiled step (mode "reduce-overhead" on a GPU:
    one CUDA graph replayed per token) has none of eager decoding's per-layer host overhead (Python, launches),
    which bounds a small decoding batch. The first rollout compiles (about a minute for a 1B model); later ones
    reuse the graph: `for_policy` keeps one per (model, stream, batch, length, device, dtype)."""

    _cache: "weakref.WeakKeyDictionary" = None

    def __init__(self, policy, length: int, device: torch.device):
        from transformers import StaticCache
        model = policy.model
        if sharded_root(model) is not None:
            # The compiled step calls the backbone and reads the LM head directly, past FSDP's gathers.
            raise ValueError("compile: the compiled decoding step does not run on a model sharded with FSDP2 "
                             "(integrations.fsdp.shard); decode eagerly (compile=False)")
        # Submodules and a weak reference only: the per-model cache below must not keep the model alive.
        self.model, self.stream = weakref.ref(model), policy.stream
        self.backbone, self.lm_head = model.base_model, model.get_output_embeddings()
        self.cache_kwarg = cache_kwarg(self.backbone)
        self.kv = StaticCache(config=model.config, max_cache_len=length)
        self.positions = torch.arange(length, device=device)
        mode = "reduce-overhead" if device.type == "cuda" else None
        self.step = torch.compile(self._forward, fullgraph=True, dynamic=False, mode=mode)

    @classmethod
    def for_policy(cls, policy, batch: int, length: int, device: torch.device) -> "StaticDecoding":
        if cls._cache is None:
            cls._cache = weakref.WeakKeyDictionary()
        per_model = cls._cache.setdefault(policy.model, {})
        key = (policy.stream, batch, length, str(device), policy.model.get_output_embeddings().weight.dtype)
        if key not in per_model:
            per_model[key] = cls(policy, length, device)   # the batch size comes with the first prefill
        return per_model[key]

    def _forward(self, input_ids, attention_mask, position_ids, cache_position):
        # The backbone itself (not integrations.decoder_forward, whose checks and stream context are host work):
        # one stream, its layout set around the call.
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, cache_position=cache_position, **{self.cache_kwarg: self.kv})
        h = out.last_hidden_state
        return last_logits(self.lm_head, h), h[:, -1]

    def _run(self, fn, *args):
        ctx = streams(self.model(), self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx:
            return fn(*args)

    def prefill(self, input_ids, attention_mask, position_ids):
        """The prompt (eager, once per rollout); attention_mask spans the whole cache [B, length]. Returns the
        last position's fp32 logits [B, V] and hidden state [B, D], as decode does."""
        self.kv.reset()
        return self._run(self._forward, input_ids, attention_mask, position_ids,
                         self.positions[:input_ids.shape[1]])

    def decode(self, tokens, attention_mask, position_ids, column: int):
        """One token per row, written to cache column `column` (compiled)."""
        return self._run(self.step, tokens, attention_mask, position_ids, self.positions[column:column + 1])


@torch.no_grad()
def generate(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
             eos_token_id: int, pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0,
             generator: torch.Generator | Sequence[torch.Generator] | None = None,
             compile: bool = False, logprobs: bool = False, value_head: torch.nn.Module | None = None) -> Rollout:
    """Sample up to max_new_tokens per prompt from `policy` (a models.PolicyHandle), with the KV cache.
    generator: one for the batch or one per prompt (sample_next).

    Stops early once every row has emitted EOS. Tokens after a row's EOS are pad and masked out (they are
    fed with attention mask 0, so they change nothing for the rows still running).
    compile: decode with a StaticDecoding (fixed-size cache, compiled step); the same tokens as without.
    logprobs: record each sampled token's log-prob and the entropy under the tempered logits it was sampled
    from (Rollout.logprobs / entropy; temperature > 0); value_head: record value_head on the policy's hidden
    state before each token (Rollout.values), as the scoring forward reads it.
    """
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.dim() != 2:
        raise ValueError(f"prompt_mask: shape {tuple(prompt_mask.shape)} must equal prompt_ids' "
                         f"{tuple(prompt_ids.shape)} ([B, P])")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if eos_token_id == pad_token_id:
        raise ValueError("pad_token_id: must differ from eos_token_id")
    if logprobs and temperature == 0:
        raise ValueError("temperature: recording log-probs needs a temperature > 0 (greedy decoding has none)")
    # fp32 adapters of a 16-bit model rounded once for the whole rollout (dropped at its end), not per token.
    with (rounded_adapters(policy.model) if policy.stream is not None else contextlib.nullcontext()):
        return _sample(policy, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id, temperature,
                       top_p, generator, compile, logprobs, value_head)


def _token_stats(logits: torch.Tensor, tok: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of tok [B], entropy [B]) under softmax(logits / temperature), fp32: what scoring computes."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, tok[:, None]).squeeze(-1), torch.special.entr(logp.exp()).sum(-1)


def _sample(policy, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_p,
            generator, compile, record_logprobs=False, value_head=None) -> Rollout:
    device = prompt_ids.device
    (B, P), mask = prompt_ids.shape, prompt_mask.long()
    if compile:
        static = StaticDecoding.for_policy(policy, B, P + max_new_tokens, device)
        # The mask spans the whole cache from the start (later columns 0 until their token exists): one shape.
        mask = torch.cat([mask, mask.new_zeros(B, max_new_tokens)], 1)
        logits, hidden = static.prefill(prompt_ids, mask, position_ids_from_mask(prompt_mask.long()))
    else:
        logits, hidden, past = policy.last(prompt_ids, mask, position_ids_from_mask(mask), None, True)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, alive_cols, stats, values = [], [], [], []
    for t in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, generator)
        alive = ~finished
        tok = torch.where(alive, tok, torch.full_like(tok, pad_token_id))
        tokens.append(tok)
        alive_cols.append(alive)
        if record_logprobs:
            stats.append(_token_stats(logits, tok, temperature))
        if value_head is not None:
            # Under FSDP2 the value head sits in the base's root group: gathered for the call.
            values.append(gathered_call(policy.model, value_head, hidden.float()).squeeze(-1))
        finished = finished | (tok == eos_token_id)
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        if compile:
            mask[:, P + t] = alive.long()
        else:
            mask = torch.cat([mask, alive.long()[:, None]], 1)
        pos = (mask.sum(-1, keepdim=True) - 1).clamp_min(0)
        if compile:
            logits, hidden = static.decode(tok[:, None], mask, pos, P + t)
        else:
            logits, hidden, past = policy.last(tok[:, None], mask, pos, past, True)
    response_ids = torch.stack(tokens, 1)
    response_mask = torch.stack(alive_cols, 1).long()
    m = response_mask.float()
    lp, ent = (torch.stack(col, 1) * m for col in zip(*stats)) if stats else (None, None)
    vals = torch.stack(values, 1) * m if values else None
    return Rollout(prompt_ids, prompt_mask.long(), response_ids, response_mask, finished, lp, ent, vals)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts without EOS and padding."""
    out = []
    for ids, n, ended in zip(rollout.response_ids.tolist(), rollout.lengths.tolist(), rollout.ended.tolist()):
        out.append(tokenizer.decode(ids[:n - 1] if ended else ids[:n], skip_special_tokens=True))
    return out


def sample_completions(models, tokenizer, prompts: Sequence[str], *, policy: str = "actor",
                       max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                       batch_size: int = 64, max_prompt_len: int = 128) -> tuple[list[str], list[bool]]:
    """(completions, ended) for `prompts` from models.policy(policy) — "actor" or "reference" (the SFT model).

    `models` is a PPOModels, or a plain (unpatched) causal LM such as Hydra-SFT's result (policy ignored).
    temperature 0 is greedy. The same seed gives the same completions.
    """
    from hydra_kernels.rlhf.models import PolicyHandle, PPOModels
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if isinstance(models, PPOModels):
        handle, device = models.policy(policy), models.device
    else:
        handle, device = PolicyHandle(models, None), next(models.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    texts, ended = [], []
    for i in range(0, len(prompts), batch_size):
        ids, mask = tokenize_prompts(tokenizer, prompts[i:i + batch_size], max_prompt_len)
        ro = generate(handle, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      temperature=temperature, top_p=top_p, generator=gen)
        texts += decode_responses(tokenizer, ro)
        ended += ro.ended.tolist()
    return texts, ended


__all__ = ["Rollout", "StaticDecoding", "generate", "sample_next", "top_p_filter", "decode_responses",
           "sample_completions"]
