"""JSONL schemas, encodings and errors; tokenization and collation."""
import json

import pytest
import torch

from hydra_kernels.rlhf.data import (PreferencePair, SFTExample, check_tokenizer, collate_sequences,
                                     load_preference_jsonl, load_prompt_jsonl, load_sft_jsonl, tokenize_pairs,
                                     tokenize_prompts, tokenize_sft)
from tests.rlhf._tiny import CharTokenizer


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_loaders(tmp_path):
    sft = _write(tmp_path / "sft.jsonl", [json.dumps({"prompt": "1+1=", "completion": "2", "extra": 1}), ""])
    pref = _write(tmp_path / "pref.jsonl", [json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"})])
    ppo = _write(tmp_path / "ppo.jsonl", [json.dumps({"prompt": "2+2="})])
    assert load_sft_jsonl(sft) == [SFTExample("1+1=", "2")]
    assert load_preference_jsonl(pref) == [PreferencePair("1+1=", "2", "3")]
    assert load_prompt_jsonl(ppo) == ["2+2="]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a"}', r":2: field 'completion': missing"),
    ('{"prompt": 3, "completion": "x"}', r":2: field 'prompt': expected a string"),
    ('{"prompt": "a", "completion": ""}', r":2: field 'completion': empty"),
    ('[1, 2]', r":2: expected a JSON object"),
    ('{"prompt": "a", ', r":2: not valid JSON"),
])
def test_bad_record_names_file_line_and_field(tmp_path, line, message):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "ok", "completion": "ok"}), line])
    with pytest.raises(ValueError, match="d.jsonl" + message):
        load_sft_jsonl(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_prompt_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_prompt_jsonl(tmp_path / "e.jsonl")


# Invalid UTF-8 and lone surrogates are bad records like any other; a UTF-8 byte-order mark is accepted.
def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: not valid UTF-8"):
        load_sft_jsonl(path)


def test_lone_surrogate_names_file_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "\\ud800"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1: field 'rejected': "):
        load_preference_jsonl(path)


def test_bom_unicode_crlf_blank_lines_and_extra_fields(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes('\ufeff{"prompt": "café 😀", "completion": "\\u00e9\\ud83d\\ude00", "x": {"y": [1]}}\r\n'
                     '\r\n   \n{"prompt": "", "completion": "z"}'.encode("utf-8"))
    assert load_sft_jsonl(path) == [SFTExample("café 😀", "é😀"), SFTExample("", "z")]


def test_pad_token_policy():
    tok = CharTokenizer()
    check_tokenizer(tok)
    tok.pad_token_id = tok.eos_token_id
    with pytest.raises(ValueError, match="pad_token_id: equals eos"):
        check_tokenizer(tok)
    tok.pad_token_id = None
    with pytest.raises(ValueError, match="pad_token_id: the tokenizer has no pad token"):
        tokenize_prompts(tok, ["1+1="], 8)


def test_left_padding_masks_and_positions():
    tok = CharTokenizer()
    b = tokenize_sft(tok, [SFTExample("12+3=", "15"), SFTExample("1+1=", "2")], max_prompt_len=16, max_len=32)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    row0 = [bos] + tok.encode("12+3=") + tok.encode("15") + [eos]
    row1 = [pad, pad] + [bos] + tok.encode("1+1=") + tok.encode("2") + [eos]
    assert b.input_ids.tolist() == [row0, row1]
    assert b.attention_mask.tolist() == [[1] * 9, [0, 0] + [1] * 7]
    assert b.position_ids.tolist() == [list(range(9)), [0, 0] + list(range(7))]
    # Only the response (with its EOS) is trained: never the prompt, the BOS or the padding.
    assert b.loss_mask.tolist() == [[0] * 6 + [1] * 3, [0] * 7 + [1] * 2]
    ids, mask = tokenize_prompts(tok, ["1+1=", "12+34="], 16)
    assert ids[0, :2].tolist() == [pad, pad] and mask[0].tolist() == [0, 0] + [1] * 5
    chosen, rejected = tokenize_pairs(tok, [PreferencePair("1+1=", "2", "33")], 16, 32)
    assert chosen.input_ids[0, -1].item() == eos and rejected.input_ids[0, -1].item() == eos


def test_truncation():
    tok = CharTokenizer()
    b = tokenize_sft(tok, [SFTExample("1234567+1=", "99999")], max_prompt_len=4, max_len=6)
    assert b.input_ids[0].tolist() == [tok.bos_token_id] + tok.encode("+1=") + tok.encode("99")
    assert b.loss_mask[0].tolist() == [0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="max_len"):
        collate_sequences([[5, 5, 5]], [[6]], 0, max_len=3)
    assert torch.equal(tokenize_prompts(tok, ["1"], 4)[0], torch.tensor([[tok.bos_token_id, tok.encode("1")[0]]]))
