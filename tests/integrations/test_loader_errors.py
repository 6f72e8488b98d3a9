"""The loaders of integrations (HydraModel.from_pretrained / load_adapters / read_config, import_peft,
checkpoint.load_safetensors) turn truncated or non-safetensors files, bad JSON and missing or mistyped fields into
a ValueError naming the file and the field or tensor; NaN / inf tensors are refused; a hydra_config.json edited
after saving (alpha, r) is checked against what the tensors and the model say. Nothing changes on error."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hydra_kernels.integrations import HydraModel, checkpoint as ckpt, import_peft

from tests.integrations._models import ALPHA, R, make_model, randomize_adapters

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

A_KEY = "adapters.actor.model.layers.0.self_attn.q_proj.lora_A"


@pytest.fixture
def saved(tmp_path):
    h = HydraModel.from_pretrained_base(make_model("llama"), r=R, alpha=ALPHA)
    randomize_adapters(h.model)
    h.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def fresh():
    h = HydraModel.from_pretrained_base(make_model("llama"), r=R, alpha=ALPHA)
    snap = [p.detach().clone() for p in h.parameters()]
    yield h
    assert all(torch.equal(a, b) for a, b in zip(snap, h.parameters())), "a failed load changed the model"


def _edit_config(d, **kw):
    cfg = json.loads((d / ckpt.CONFIG_NAME).read_text())
    for k, v in kw.items():
        if v is KeyError:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / ckpt.CONFIG_NAME).write_text(json.dumps(cfg))


def test_a_truncated_weights_file_names_the_file(saved, fresh):
    f = saved / ckpt.WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"load_dir: '{f}' is not a readable safetensors file"):
        fresh.load_adapters(saved)
    with pytest.raises(ValueError, match=rf"path: '{f}' is not a readable safetensors file"):
        ckpt.load_safetensors(f)


def test_bad_json_names_the_file(saved, fresh):
    (saved / ckpt.CONFIG_NAME).write_text('{"format": "hydra_kernels.HydraModel", ')
    with pytest.raises(ValueError, match=rf"load_dir: '{saved / ckpt.CONFIG_NAME}' is not readable JSON"):
        fresh.load_adapters(saved)
    (saved / ckpt.CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"hydra_config.json' holds a JSON list, expected an object"):
        HydraModel.read_config(saved)


@pytest.mark.parametrize("edit, match", [
    ({"r": KeyError}, r"missing field 'r'"),
    ({"adapters": KeyError}, r"missing field 'adapters'"),
    ({"r": "4"}, r"field r: expected a positive int, got '4'"),
    ({"r": True}, r"field r: expected a positive int, got True"),
    ({"alpha": "8"}, r"field alpha: expected a number, got '8'"),
    ({"alpha": -8}, r"field alpha: must be a finite positive number"),
    ({"adapters": "actor"}, r"field adapters: expected a list of names, got 'actor'"),
    ({"adapters": ["actor", "actor"]}, r"field adapters: need distinct non-empty names"),
    ({"modules": "q_proj"}, r"field 'modules' must be a list of distinct non-empty names"),
    ({"merged_into_base": [1]}, r"field 'merged_into_base' must be a list"),
    ({"hidden_size": "32"}, r"field 'hidden_size' must be a positive int"),
])
def test_missing_and_mistyped_fields_are_named(saved, fresh, edit, match):
    _edit_config(saved, **edit)
    with pytest.raises(ValueError, match=rf"load_dir: '{saved / ckpt.CONFIG_NAME}': {match}"):
        fresh.load_adapters(saved)
    with pytest.raises(ValueError, match=match):
        HydraModel.from_pretrained(saved, base=make_model("llama"))


@pytest.mark.parametrize("edit, match", [
    ({"alpha": 16}, r"field 'alpha' is 16.0, but .*hydra_model.safetensors' was saved with alpha=8.0"),
    ({"r": 8}, r"field 'r' is 8, but .*hydra_model.safetensors' was saved with r=4"),
])
def test_an_edited_config_is_checked_against_the_tensors(saved, edit, match):
    """from_pretrained patches the base with the config's r and alpha, so the model agrees with an edited config:
    the tensors (their header, their rank) must agree too."""
    _edit_config(saved, **edit)
    with pytest.raises(ValueError, match=match):
        HydraModel.from_pretrained(saved, base=make_model("llama"))


def test_an_edited_rank_without_a_header_is_checked_against_the_tensors(saved):
    t = load_file(saved / ckpt.WEIGHTS_NAME)
    save_file(t, saved / ckpt.WEIGHTS_NAME)                     # the header's LoRA record dropped
    _edit_config(saved, r=8)
    with pytest.raises(ValueError, match=r"field 'r' is 8, but the adapters in .* have rank 4"):
        HydraModel.from_pretrained(saved, base=make_model("llama"))


def test_config_fields_are_checked_against_the_model(saved, fresh):
    _edit_config(saved, hidden_size=64)
    with pytest.raises(ValueError, match=r"field 'hidden_size' is 64, the model's is 32"):
        fresh.load_adapters(saved)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused(saved, fresh, value):
    t = load_file(saved / ckpt.WEIGHTS_NAME)
    t[A_KEY][0, 0] = value
    save_file(t, saved / ckpt.WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"load_dir: tensor '{A_KEY}' in .* holds NaN or inf values"):
        fresh.load_adapters(saved)


def test_integer_tensors_are_refused(saved, fresh):
    t = load_file(saved / ckpt.WEIGHTS_NAME)
    t[A_KEY] = t[A_KEY].to(torch.int32)
    save_file(t, saved / ckpt.WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"tensor '{A_KEY}' has dtype torch.int32"):
        fresh.load_adapters(saved)


# --------------------------------------------------------------------------------------------------- PEFT
@pytest.fixture
def peft_dir(tmp_path):
    h = HydraModel.from_pretrained_base(make_model("llama"), r=R, alpha=ALPHA)
    randomize_adapters(h.model)
    h.merge(None, tmp_path / "base")
    return h.export_peft("actor", tmp_path / "peft")


@pytest.mark.parametrize("edit, match", [
    ({"lora_alpha": "8"}, r"field 'lora_alpha' must be a finite positive number, got '8'"),
    ({"lora_alpha": None}, r"field 'lora_alpha' must be a finite positive number, got None"),
    ({"r": "4"}, r"field 'r' must be a positive int, got '4'"),
    ({"r": True}, r"field 'r' must be a positive int, got True"),
    ({"alpha_pattern": ["x"]}, r"field 'alpha_pattern' must be an object"),
    ({"rank_pattern": {"q_proj": "4"}}, r"field 'rank_pattern' must be a map to positive ints"),
])
def test_peft_config_fields_are_named(peft_dir, fresh, edit, match):
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg.update(edit)
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"peft_dir: '{peft_dir / 'adapter_config.json'}': {match}"):
        import_peft(fresh.model, "critic", peft_dir)


def test_peft_bad_json_truncated_and_non_finite_files_are_named(peft_dir, fresh):
    weights, config = peft_dir / "adapter_model.safetensors", peft_dir / "adapter_config.json"
    good = config.read_text()
    config.write_text(good[:-20])
    with pytest.raises(ValueError, match=rf"peft_dir: '{config}' is not readable JSON"):
        import_peft(fresh.model, "critic", peft_dir)
    config.write_text(good)
    t = load_file(weights)
    key = next(iter(t))
    t[key][0, 0] = float("nan")
    save_file(t, weights)
    with pytest.raises(ValueError, match=rf"peft_dir: tensor '{key}' in '{weights}' holds NaN or inf values"):
        import_peft(fresh.model, "critic", peft_dir)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"peft_dir: '{weights}' is not a readable safetensors file"):
        import_peft(fresh.model, "critic", peft_dir)
