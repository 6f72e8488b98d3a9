"""Model directories load from safetensors only (nothing is unpickled, no model code runs): a directory with only
pickle weights is refused with the command that converts it, and one with both loads its safetensors."""
import pytest
import torch

from hydra_kernels.integrations import HydraModel, load_causal_lm

from tests.integrations._models import R, make_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LOADERS = {"from_pretrained_base": lambda d: HydraModel.from_pretrained_base(d, r=R).model,
           "load_causal_lm": lambda d: load_causal_lm(d, name="base")}


def _pickle_dir(d, model):
    d.mkdir()
    model.config.save_pretrained(str(d))
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    return d


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_pickle_only_directories_are_refused_with_how_to_convert(tmp_path, loader, no_unpickling):
    d = _pickle_dir(tmp_path / "m", make_model("llama"))
    with pytest.raises(ValueError, match=rf"base: '{d}' holds only pickle weights \(pytorch_model.bin\); "
                                         r"hydra_kernels loads safetensors only") as e:
        LOADERS[loader](d)
    assert f"AutoModelForCausalLM.from_pretrained('{d}').save_pretrained('{d}')" in str(e.value)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_safetensors_are_loaded_when_both_are_there(tmp_path, loader, no_unpickling):
    model = make_model("llama")
    model.save_pretrained(tmp_path / "m")
    torch.save({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, tmp_path / "m" / "pytorch_model.bin")
    loaded = LOADERS[loader](tmp_path / "m")
    key = "model.embed_tokens.weight"
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])


def test_remote_code_is_opt_in_and_still_safetensors_only(tmp_path, no_unpickling):
    model = make_model("llama")
    _pickle_dir(tmp_path / "m", model)
    with pytest.raises(ValueError, match=r"base: .*pickle"):
        HydraModel.from_pretrained_base(tmp_path / "m", r=R, trust_remote_code=True)
    model.save_pretrained(tmp_path / "s")
    assert HydraModel.from_pretrained_base(tmp_path / "s", r=R, trust_remote_code=True).model is not None


def test_a_truncated_weights_file_is_a_value_error_naming_the_directory(tmp_path):
    make_model("llama").save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"base: cannot load a model from '{tmp_path / 'm'}'"):
        HydraModel.from_pretrained_base(tmp_path / "m", r=R)
