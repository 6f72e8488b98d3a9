"""export_peft names the model its adapter belongs on: the absolute path of the directory holding the base as
it is in memory, so peft's AutoPeftModelForCausalLM reproduces the adapter's stream from the export alone. A
base with an adapter merged into it in place (Hydra-SFT) is in no directory, and is refused until written."""
import json

import pytest
import torch

from hydra_kernels import streams
from hydra_kernels.integrations import HydraModel, base_directory

from tests.integrations._models import ALPHA, R, batch, logits, make_model, randomize_adapters

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _peft_logits(peft_dir):
    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained(str(peft_dir), dtype=torch.float32).eval()
    return logits(model, *batch())


def _stream_logits(h, stream):
    with streams(h.model, stream):
        return logits(h.model, *batch())


def test_a_base_loaded_by_a_relative_path_is_named_absolute(tmp_path, monkeypatch):
    make_model("llama").save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    h = HydraModel.from_pretrained_base("model", r=R, alpha=ALPHA, dtype=torch.float32)
    randomize_adapters(h.model)
    h.export_peft("actor", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((tmp_path / "model").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")                   # the export does not depend on the working dir
    torch.testing.assert_close(_peft_logits(tmp_path / "peft"), _stream_logits(h, "actor"), rtol=1e-5, atol=1e-5)


def test_a_base_merged_in_place_is_refused_until_written(tmp_path, monkeypatch):
    """Hydra-SFT's case: the "sft" adapter is merged into the base in memory, then the actor is exported. The
    directory the model was loaded from holds the pre-SFT model, which must not be named."""
    make_model("llama").save_pretrained(tmp_path / "pre-sft")
    monkeypatch.chdir(tmp_path)
    h = HydraModel.from_pretrained_base("pre-sft", adapters=("sft", "actor"), r=R, alpha=ALPHA, dtype=torch.float32)
    randomize_adapters(h.model)
    h.merge_adapter_into_base("sft")
    randomize_adapters(h.model, seed=1)
    with pytest.raises(ValueError, match=r"model: no directory on disk holds this model's base weights "
                                         r"\(adapters \['sft'\] are merged into its base in memory"):
        h.export_peft("actor", tmp_path / "peft")
    assert not (tmp_path / "peft").exists() and base_directory(h.model)[0] is None
    h.merge(None, "sft-base")                                   # the merged base, written: now the adapter's base
    h.export_peft("actor", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((tmp_path / "sft-base").resolve())
    torch.testing.assert_close(_peft_logits(tmp_path / "peft"), _stream_logits(h, "actor"), rtol=1e-5, atol=1e-5)


def test_a_base_changed_in_memory_or_built_there_is_refused(tmp_path):
    h = HydraModel.from_pretrained_base(make_model("llama"), r=R, alpha=ALPHA)
    with pytest.raises(ValueError, match=r"model: no directory on disk .*built in memory"):
        h.export_peft("actor", tmp_path / "peft")
    h.merge(None, tmp_path / "base")
    h.export_peft("actor", tmp_path / "peft")
    assert base_directory(h.model)[0] == str((tmp_path / "base").resolve())
    with torch.no_grad():
        next(iter(h.hydra_layers().values())).weight.add_(1.0)   # trained or edited in place, no merge recorded
    with pytest.raises(ValueError, match=r"model: no directory on disk .*differs from the one in"):
        h.export_peft("actor", tmp_path / "peft2")
