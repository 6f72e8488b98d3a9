"""Config loading/overrides/validation; JSONL schemas and errors; tokenization and collation."""
import json

import pytest
import torch

from hydra_kernels.rlhf.config import (PPOConfig, SFTConfig, apply_overrides, config_from_dict, config_to_dict,
                                       load_config, save_config)
from hydra_kernels.rlhf.data import (PreferencePair, SFTExample, check_tokenizer, collate_sequences,
                                     load_preference_jsonl, load_prompt_jsonl, load_sft_jsonl, tokenize_pairs,
                                     tokenize_prompts, tokenize_sft)
from tests.rlhf._tiny import CharTokenizer


# ------------------------------------------------------------------------------------------------ config
def test_defaults_are_valid_and_round_trip(tmp_path):
    for cls in (SFTConfig, PPOConfig):
        cfg = cls()
        assert config_from_dict(cls, config_to_dict(cfg)) == cfg
        save_config(cfg, tmp_path / "c.json")
        assert load_config(cls, tmp_path / "c.json") == cfg


def test_yaml_file_then_dotted_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("variant: j-hydra\nkl_coef: 0.1\nlora: {r: 8}\nrun:\n  seed: 3\n")
    cfg = load_config(PPOConfig, tmp_path / "c.yaml", ["lora.alpha=4", "run.seed=5", "adaptive_kl=true",
                                                        "missing_eos_penalty=1", "lora.target_modules=[q_proj,v_proj]"])
    assert (cfg.variant, cfg.kl_coef, cfg.lora.r, cfg.lora.alpha, cfg.run.seed) == ("j-hydra", 0.1, 8, 4.0, 5)
    assert cfg.adaptive_kl is True and cfg.missing_eos_penalty == 1.0
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert apply_overrides(cfg, ["missing_eos_penalty=null"]).missing_eos_penalty is None


@pytest.mark.parametrize("override, field", [
    ("variant=ppo", "variant"), ("lora.r=0", "lora.r"), ("kl_coef=-1", "kl_coef"), ("top_p=1.5", "top_p"),
    ("mini_batch_size=5", "mini_batch_size"), ("run.seed=1.5", "run.seed"), ("kl_estimator=k4", "kl_estimator"),
    ("lora.rank=4", "lora.rank"), ("steps=many", "steps"), ("data.max_len=8", "data.max_len"),
    ("run.device=tpu", "run.device"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        load_config(PPOConfig, None, [override])


@pytest.mark.parametrize("kl", ["k1", "k2", "k3", "full"])
def test_every_kl_estimator_of_the_ops_is_accepted(kl):
    assert load_config(PPOConfig, None, [f"kl_estimator={kl}"]).kl_estimator == kl


def test_bad_files_and_pairs(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_config(PPOConfig, tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(SFTConfig, tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="key=value"):
        load_config(SFTConfig, None, ["epochs"])
    with pytest.raises(ValueError, match=r"unknown field.*did you mean 'lora.alpha'"):
        load_config(SFTConfig, None, ["lora.alhpa=3"])
    with pytest.raises(ValueError, match="^mode: "):
        SFTConfig(mode="qlora")


# -------------------------------------------------------------------------------------------------- data
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
