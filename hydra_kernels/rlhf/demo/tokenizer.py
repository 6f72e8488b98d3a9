"""A character-level tokenizer built locally as a real `transformers` tokenizer.

One token per character, plus distinct special tokens. It is a `PreTrainedTokenizerFast` over a `tokenizers`
WordLevel model, saved with `save_pretrained`, so the pipeline loads it with `AutoTokenizer.from_pretrained`
exactly like a user's tokenizer. pad and eos are different ids on purpose: pad == eos corrupts value targets
and reward positions (see hydra_kernels.rlhf.data.check_tokenizer).
"""
from __future__ import annotations

import os

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIALS = (PAD, EOS, BOS, UNK)
# Digits first after the specials, so token id - 4 is the digit's value; handy when reading logs.
DEFAULT_ALPHABET = "0123456789+-=*() "


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A PreTrainedTokenizerFast with one token per character of `alphabet` (and <pad>, <eos>, <bos>, <unk>).

    Encoding adds no special tokens (no BOS is prepended): prompts and completions concatenate token for token.
    Decoding joins characters without spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError("alphabet: need a non-empty string of characters")
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet: characters must be distinct, got {alphabet!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token, spaces included ("isolated" keeps them as tokens).
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                   unk_token=UNK, padding_side="left", model_max_length=512)


def save_char_tokenizer(path: str | os.PathLike, alphabet: str = DEFAULT_ALPHABET):
    """Build the tokenizer, save it to directory `path`, and return it."""
    tok = build_char_tokenizer(alphabet)
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(str(path))
    return tok
