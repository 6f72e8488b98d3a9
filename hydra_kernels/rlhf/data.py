"""JSONL inputs, tokenization and collation for Hydra-SFT and PPO.

Schemas (one JSON object per line; blank lines are skipped; extra keys are ignored):
    SFT demonstrations   {"prompt": str, "completion": str}
    preference pairs     {"prompt": str, "chosen": str, "rejected": str}
    PPO prompts          {"prompt": str}
A bad record raises ValueError("<file>:<line>: field '<name>': <why>"). The text is used verbatim: a prompt
is tokenized on its own and the response on its own, so the prompt/response boundary is exact.

Tokenizer contract (Hugging Face tokenizers satisfy it; so does the demo's char tokenizer):
    encode(text, add_special_tokens=False) -> list[int]
    decode(ids, skip_special_tokens=True) -> str
    eos_token_id: int;  pad_token_id: int, distinct from eos;  bos_token_id: int | None
Pad token policy: a tokenizer without a pad token, or with pad == eos, is REJECTED (ValueError), because
pad == eos corrupts reward positions and value targets. `add_pad_token(tokenizer, model)` adds a distinct
one to a Hugging Face tokenizer and resizes the model's embeddings; call it before patching the model.

Token layout:
    prompt   = [bos] + encode(prompt)        (bos only when the tokenizer has one distinct from eos;
                                              prompts longer than max_prompt_len keep their last tokens)
    response = encode(completion) + [eos]
Everything is LEFT-padded, so the last real token of every row sits at the last column (the reward head
reads there) and generation appends to the right; position ids come from the mask (cumsum − 1).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from hydra_kernels.integrations import position_ids_from_attention_mask

# The name rlhf.rollout imports; the one definition is integrations'.
position_ids_from_mask = position_ids_from_attention_mask


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    completion: str


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


# ------------------------------------------------------------------------------------------- loading
def _read_jsonl(path: str | os.PathLike, fields: Sequence[str]) -> list[dict]:
    path = os.fspath(path)
    try:
        # utf-8-sig: a byte-order mark is skipped; surrogateescape: invalid bytes are reported with their line.
        f = open(path, encoding="utf-8-sig", errors="surrogateescape")
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from None
    records = []
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{ord(line[e.start]) - 0xDC00:02x} at "
                                 f"column {e.start + 1})") from None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for name in fields:
                if name not in obj:
                    raise ValueError(f"{path}:{lineno}: field '{name}': missing")
                if not isinstance(obj[name], str):
                    raise ValueError(f"{path}:{lineno}: field '{name}': expected a string, "
                                     f"got {type(obj[name]).__name__}")
                try:
                    obj[name].encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{path}:{lineno}: field '{name}': not valid Unicode (an unpaired surrogate "
                                     f"escape such as \\ud800)") from None
            # An empty response trains nothing and has no last token to reward; an empty prompt is allowed.
            for name in fields[1:]:
                if not obj[name]:
                    raise ValueError(f"{path}:{lineno}: field '{name}': empty string")
            records.append(obj)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def load_sft_jsonl(path: str | os.PathLike) -> list[SFTExample]:
    """Demonstrations {"prompt", "completion"}."""
    return [SFTExample(r["prompt"], r["completion"]) for r in _read_jsonl(path, ("prompt", "completion"))]


def load_preference_jsonl(path: str | os.PathLike) -> list[PreferencePair]:
    """Preference pairs {"prompt", "chosen", "rejected"}."""
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"])
            for r in _read_jsonl(path, ("prompt", "chosen", "rejected"))]


def load_prompt_jsonl(path: str | os.PathLike) -> list[str]:
    """PPO prompts {"prompt"}."""
    return [r["prompt"] for r in _read_jsonl(path, ("prompt",))]


def load_prompt_records(path: str | os.PathLike) -> list[dict]:
    """Prompt rows {"prompt", ...} with their other fields (the columns TRL-style reward functions receive)."""
    return _read_jsonl(path, ("prompt",))


def write_jsonl(path: str | os.PathLike, records: Iterable) -> None:
    """Write dicts or the record dataclasses above as JSONL (atomically)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r if isinstance(r, dict) else r.__dict__, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- tokenization
def check_tokenizer(tokenizer) -> None:
    """Raise ValueError unless the tokenizer has an int eos and a distinct int pad token."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if not isinstance(eos, int):
        raise ValueError(f"tokenizer.eos_token_id: need an int end-of-sequence id, got {eos!r}")
    if not isinstance(pad, int):
        raise ValueError("tokenizer.pad_token_id: the tokenizer has no pad token; add a distinct one with "
                         "hydra_kernels.rlhf.data.add_pad_token(tokenizer, model) before patching the model")
    if pad == eos:
        raise ValueError(f"tokenizer.pad_token_id: equals eos_token_id ({eos}); pad == eos corrupts reward "
                         "positions and value targets; add a distinct pad token with add_pad_token(tokenizer, model)")


def add_pad_token(tokenizer, model=None, token: str = "<|pad|>") -> int:
    """Give a Hugging Face tokenizer a pad token distinct from eos; resize `model`'s embeddings to match.

    Returns the pad id. Does nothing (but return it) when a distinct pad token already exists.
    """
    pad, eos = getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if isinstance(pad, int) and pad != eos:
        return pad
    if not hasattr(tokenizer, "add_special_tokens"):
        raise ValueError("tokenizer: has no usable pad token and no add_special_tokens(); give it a pad token "
                         "distinct from eos")
    tokenizer.add_special_tokens({"pad_token": token})
    if model is not None:
        n = len(tokenizer)
        if model.get_input_embeddings().weight.shape[0] < n:
            model.resize_token_embeddings(n)
    return tokenizer.pad_token_id


def encode_prompt(tokenizer, text: str, max_prompt_len: int) -> list[int]:
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [bos] if isinstance(bos, int) and bos != tokenizer.eos_token_id else []
    keep = max_prompt_len - len(head)
    if keep < 0:
        raise ValueError(f"max_prompt_len: must leave room for the BOS token, got {max_prompt_len}")
    return head + (ids[-keep:] if keep else [])


def encode_response(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) + [tokenizer.eos_token_id]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None):
    """(ids [B, W], mask [B, W]) with each row right-aligned."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) > width:
            raise ValueError(f"rows: row {i} has {len(r)} tokens, more than width {width}")
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


@dataclass
class TokenBatch:
    """Left-padded prompt+response sequences for teacher-forced passes (SFT, reward scoring).

    input_ids, attention_mask, position_ids: [B, T]. loss_mask [B, T]: 1 where the token is a response token
    (the LM loss predicts it from the previous position; prompt and padding never count). A row with an empty
    prompt (no BOS) has no real token before its first response token, so that token is 0 too: it would be
    "predicted" from a padding position, whose hidden state depends on the rest of the batch.
    The last column is every row's last real token.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device) -> "TokenBatch":
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                   self.loss_mask)))


def collate_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                      max_len: int | None = None) -> TokenBatch:
    """Concatenate prompt and response token lists, cut responses so the total is ≤ max_len, left-pad."""
    if len(prompts) != len(responses):
        raise ValueError(f"responses: {len(responses)} responses for {len(prompts)} prompts")
    rows, loss_rows = [], []
    for p, r in zip(prompts, responses):
        r = list(r)
        if max_len is not None:
            if len(p) >= max_len:
                raise ValueError(f"max_len: a prompt of {len(p)} tokens leaves no room for a response "
                                 f"(max_len {max_len})")
            r = r[:max_len - len(p)]
        rows.append(list(p) + r)
        loss_rows.append([0] * len(p) + [1 if p or j else 0 for j in range(len(r))])
    ids, mask = left_pad(rows, pad_id)
    loss_mask, _ = left_pad(loss_rows, 0, width=ids.shape[1])
    return TokenBatch(ids, mask, position_ids_from_attention_mask(mask), loss_mask)


def tokenize_sft(tokenizer, examples: Sequence[SFTExample], max_prompt_len: int, max_len: int) -> TokenBatch:
    check_tokenizer(tokenizer)
    prompts = [encode_prompt(tokenizer, e.prompt, max_prompt_len) for e in examples]
    responses = [encode_response(tokenizer, e.completion) for e in examples]
    return collate_sequences(prompts, responses, tokenizer.pad_token_id, max_len)


def tokenize_pairs(tokenizer, pairs: Sequence[PreferencePair], max_prompt_len: int,
                   max_len: int) -> tuple[TokenBatch, TokenBatch]:
    """(chosen batch, rejected batch), row i of each from pair i."""
    check_tokenizer(tokenizer)
    prompts = [encode_prompt(tokenizer, p.prompt, max_prompt_len) for p in pairs]
    chosen = collate_sequences(prompts, [encode_response(tokenizer, p.chosen) for p in pairs],
                               tokenizer.pad_token_id, max_len)
    rejected = collate_sequences(prompts, [encode_response(tokenizer, p.rejected) for p in pairs],
                                 tokenizer.pad_token_id, max_len)
    return chosen, rejected


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask [B, P] for generation."""
    check_tokenizer(tokenizer)
    rows = [encode_prompt(tokenizer, p, max_prompt_len) for p in prompts]
    if any(not r for r in rows):
        raise ValueError("prompts: an empty prompt with no BOS token gives the model nothing to condition on")
    return left_pad(rows, tokenizer.pad_token_id)


__all__ = ["SFTExample", "PreferencePair", "load_sft_jsonl", "load_preference_jsonl", "load_prompt_jsonl",
           "load_prompt_records",
           "write_jsonl", "check_tokenizer", "add_pad_token", "encode_prompt", "encode_response",
           "left_pad", "TokenBatch", "collate_sequences", "tokenize_sft",
           "tokenize_pairs", "tokenize_prompts"]
