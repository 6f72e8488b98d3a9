"""Checkpoint files: mismatches fail naming the tensor, writes are atomic and fsynced, merged directories, PEFT
errors."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hydra_kernels.integrations import HydraModel, checkpoint as ckpt, export_peft, import_peft
from hydra_kernels.integrations.checkpoint import write_dir_atomically

from tests.integrations._models import ALPHA, R, batch, logits, make_model, merged_copy, randomize_adapters

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def saved(tmp_path, arch="llama", **kw):
    h = HydraModel.from_pretrained_base(make_model(arch), r=R, alpha=ALPHA, **kw)
    randomize_adapters(h.model)
    h.save_pretrained(tmp_path / "ckpt")
    return h, tmp_path / "ckpt"


def snapshot(h):
    return [p.detach().clone() for p in h.parameters() if p.requires_grad]


def unchanged(h, snap):
    return all(torch.equal(a, b) for a, b in zip(snapshot(h), snap))


def test_files_are_safetensors_and_json_only(tmp_path):
    h, d = saved(tmp_path)
    assert sorted(os.listdir(d)) == ["hydra_config.json", "hydra_model.safetensors"]
    cfg = json.loads((d / "hydra_config.json").read_text())
    assert cfg["adapters"] == ["actor", "critic"] and cfg["r"] == R and cfg["alpha"] == ALPHA
    assert cfg["modules"] == list(h.patch.modules) and cfg["model_type"] == "llama"
    keys = load_file(d / "hydra_model.safetensors").keys()
    assert "adapters.actor.model.layers.0.self_attn.q_proj.lora_A" in keys and "value_head.weight" in keys
    assert len(keys) == 2 * 2 * len(h.patch.modules) + 4


def test_mismatched_adapters_rank_and_modules_are_named(tmp_path):
    _, d = saved(tmp_path)
    with pytest.raises(ValueError, match=r"adapters: the model is already patched with adapters=\('policy',\)"):
        from hydra_kernels import patch_model
        HydraModel.from_pretrained(d, base=patch_model(make_model("llama"), adapters=("policy",), r=R, alpha=ALPHA))
    other = HydraModel.from_pretrained_base(make_model("llama"), adapters=("actor", "value"), r=R, alpha=ALPHA)
    with pytest.raises(ValueError, match=r"adapters: checkpoint .* has adapters \('actor', 'critic'\), the model has"):
        other.load_adapters(d)
    other = HydraModel.from_pretrained_base(make_model("llama"), r=2 * R, alpha=ALPHA)
    with pytest.raises(ValueError, match=r"r: checkpoint has r=4"):
        other.load_adapters(d)
    partial = HydraModel.from_pretrained_base(make_model("llama"), r=R, alpha=ALPHA, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.k_proj' is not patched in this model"):
        partial.load_adapters(d)


def test_dtype_for_an_unpatched_instance_keeps_fp32_master_adapters():
    from hydra_kernels import patch_model
    h = HydraModel.from_pretrained_base(make_model("llama"), r=R, alpha=ALPHA, dtype=torch.bfloat16)
    assert h.lm_head_weight.dtype == torch.bfloat16 and h.lora_parameters()[0].dtype == torch.float32
    with pytest.raises(ValueError, match="dtype: the model is already patched"):
        HydraModel.from_pretrained_base(patch_model(make_model("llama"), r=R, alpha=ALPHA), dtype=torch.bfloat16)


def _edit(d, fn):
    tensors = load_file(d / "hydra_model.safetensors")
    fn(tensors)
    save_file(tensors, d / "hydra_model.safetensors")


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("adapters.critic.model.layers.1.mlp.up_proj.lora_B"),
     r"missing tensor 'adapters.critic.model.layers.1.mlp.up_proj.lora_B'"),
    (lambda t: t.__setitem__("adapters.actor.model.layers.0.self_attn.v_proj.lora_A", torch.zeros(R, 31)),
     r"tensor 'adapters.actor.model.layers.0.self_attn.v_proj.lora_A' has shape \(4, 31\), the model expects \(4, 32\)"),
    (lambda t: t.__setitem__("reward_head.weight", torch.zeros(1, 16)),
     r"tensor 'reward_head.weight' has shape \(1, 16\), the model expects \(1, 32\)"),
    (lambda t: t.pop("value_head.bias"), r"missing tensor 'value_head.bias'"),
    (lambda t: t.__setitem__("adapters.actor.lm_head.lora_A", torch.zeros(R, 32)),
     r"unexpected tensor 'adapters.actor.lm_head.lora_A'"),
])
def test_bad_tensors_fail_naming_the_tensor_and_change_nothing(tmp_path, edit, match):
    _, d = saved(tmp_path)
    _edit(d, edit)
    h = HydraModel.from_pretrained_base(make_model("llama"), r=R, alpha=ALPHA)
    snap = snapshot(h)
    with pytest.raises(ValueError, match=match):
        h.load_adapters(d)
    assert unchanged(h, snap)


def test_not_a_checkpoint(tmp_path):
    h = HydraModel.from_pretrained_base(make_model("llama"), r=R)
    with pytest.raises(ValueError, match=r"load_dir: .* has no hydra_config.json"):
        h.load_adapters(tmp_path)
    (tmp_path / "hydra_config.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match=r"load_dir: .* is not a hydra_kernels.HydraModel v1 config"):
        h.load_adapters(tmp_path)


def test_writes_are_atomic(tmp_path, monkeypatch):
    h, d = saved(tmp_path)
    before = (d / "hydra_model.safetensors").read_bytes()
    randomize_adapters(h.model, seed=7)
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        h.save_pretrained(d)
    assert (d / "hydra_model.safetensors").read_bytes() == before     # the old checkpoint is intact
    assert sorted(os.listdir(d)) == ["hydra_config.json", "hydra_model.safetensors"]   # no temp files left
    monkeypatch.undo()
    h.save_pretrained(d)
    assert (d / "hydra_model.safetensors").read_bytes() != before


# Without the directory fsync before the rename, a power loss could keep the renamed directory but lose entries
# such as a checkpoint's state.json; the parent is fsynced after the rename.
def test_directory_entries_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(ckpt, "fsync_path", lambda p: events.append(("fsync", os.fspath(p))))
    real_replace = os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: events.append(("rename", os.fspath(a))) or real_replace(a, b))

    def fill(tmp):
        (tmp / "a.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"x")
    out = write_dir_atomically(tmp_path / "final", fill)
    rename = next(i for i, e in enumerate(events) if e[0] == "rename")
    tmp = events[rename][1]
    before = {p for kind, p in events[:rename] if kind == "fsync"}
    assert {os.path.join(tmp, "a.json"), os.path.join(tmp, "sub", "b.bin"), os.path.join(tmp, "sub"), tmp} <= before
    assert ("fsync", os.fspath(tmp_path)) in events[rename:]
    assert (out / "sub" / "b.bin").read_bytes() == b"x"


def test_merged_directory_sharded_and_overwritten(tmp_path):
    from transformers import AutoModelForCausalLM
    ref = make_model("gpt2")
    h = HydraModel.from_pretrained_base(copy.deepcopy(ref), r=R, alpha=ALPHA)
    randomize_adapters(h.model)
    out = tmp_path / "merged"
    ckpt.save_merged(h.model, "actor", out)                  # an earlier merged directory, one file
    assert (out / "model.safetensors").is_file()
    ckpt.save_merged(h.model, "critic", out, max_shard_size=20_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    assert not [f for f in os.listdir(tmp_path) if f != "merged"]          # temp dirs cleaned up
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    state = merged.state_dict()
    assert merged.lm_head.weight is merged.transformer.wte.weight          # still tied
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)   # Conv1D layout [in, out] again
    ids, mask = batch()
    torch.testing.assert_close(logits(merged, ids, mask), logits(merged_copy(ref, h.model, "critic"), ids, mask),
                               rtol=1e-5, atol=1e-5)
    base = ckpt.merged_state_dict(h.model, None)
    assert all(torch.equal(base[k], v) for k, v in ref.state_dict().items() if k in base)
    with pytest.raises(ValueError, match=r"adapter: 'policy' is not one of the model's adapters"):
        h.merge("policy", tmp_path / "x")


def test_peft_export_config_and_keys(tmp_path):
    h = HydraModel.from_pretrained_base(make_model("gpt2"), r=R, alpha=ALPHA, target_modules=["c_attn", "mlp.c_proj"])
    h.merge(None, tmp_path / "base")                          # an in-memory base is written first (export names it)
    export_peft(h.model, "actor", tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == R and cfg["lora_alpha"] == ALPHA and cfg["fan_in_fan_out"]
    # "c_proj" would also select attn.c_proj, which is not patched: the exact paths are written instead.
    assert isinstance(cfg["target_modules"], str) and "transformer\\.h\\.0\\.mlp\\.c_proj" in cfg["target_modules"]
    t = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert t["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (R, 32)
    assert t["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, R)
    h2 = HydraModel.from_pretrained_base(make_model("llama"), r=R, alpha=ALPHA)
    h2.merge(None, tmp_path / "base2")
    export_peft(h2.model, "critic", tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert cfg["fan_in_fan_out"] is False


def test_peft_import_errors(tmp_path):
    h = HydraModel.from_pretrained_base(make_model("llama"), r=R, alpha=ALPHA)
    h.merge(None, tmp_path / "base")
    export_peft(h.model, "actor", tmp_path / "p")
    snap = snapshot(h)

    def with_config(**kw):
        d = tmp_path / ("c" + str(len(os.listdir(tmp_path))))
        d.mkdir()
        cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
        cfg.update(kw)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        (d / "adapter_model.safetensors").write_bytes((tmp_path / "p" / "adapter_model.safetensors").read_bytes())
        return d
    for kw, match in [({"r": 8}, r"has rank r=8 .* the model's adapters have r=4"),
                      ({"lora_alpha": 16}, r"has lora_alpha=16 .* alpha=8"),
                      ({"use_rslora": True}, "rsLoRA"), ({"use_dora": True}, "DoRA"),
                      ({"modules_to_save": ["score"]}, "modules_to_save"),
                      ({"peft_type": "IA3"}, "only LORA")]:
        with pytest.raises(ValueError, match=match):
            import_peft(h.model, "critic", with_config(**kw))
    d = with_config()
    t = load_file(d / "adapter_model.safetensors")
    t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(R, 32)
    save_file(t, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'base_model.model.lm_head.lora_A.weight': module 'lm_head' is not"):
        import_peft(h.model, "critic", d)
    t.pop("base_model.model.lm_head.lora_A.weight")
    t.pop("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight")
    save_file(t, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"no lora_B for module 'model.layers.0.mlp.up_proj'"):
        import_peft(h.model, "critic", d)
    os.remove(d / "adapter_model.safetensors")
    (d / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no adapter_model.safetensors \(adapter_model.bin is a pickle"):
        import_peft(h.model, "critic", d)
    with pytest.raises(ValueError, match=r"adapter: 'base' is not one of"):
        import_peft(h.model, "base", tmp_path / "p")
    assert unchanged(h, snap)


def test_merge_history_travels_with_the_base_and_guards_loading(tmp_path):
    """Hydra-SFT: merge the SFT adapter into the base, write that base, train PPO adapters on it; loading those
    adapters on the pre-SFT base would make "LoRA off" the wrong model, so it is refused."""
    from hydra_kernels.integrations import merged_adapters, unpatch_model
    from hydra_kernels import patch_model
    ref = make_model("llama")
    sft = HydraModel.from_pretrained_base(copy.deepcopy(ref), adapters=("sft",), r=R, alpha=ALPHA)
    randomize_adapters(sft.model)
    sft.merge_adapter_into_base("sft")
    assert sft.patch.merged == ("sft",) and sft.model.config.hydra_merged_adapters == ["sft"]
    sft.merge(None, tmp_path / "sft_base")
    assert json.loads((tmp_path / "sft_base" / "config.json").read_text())["hydra_merged_adapters"] == ["sft"]
    ppo = HydraModel.from_pretrained_base(tmp_path / "sft_base", r=R, alpha=ALPHA, dtype=torch.float32)
    assert ppo.patch.merged == ("sft",)
    randomize_adapters(ppo.model)
    ppo.save_pretrained(tmp_path / "ppo")
    assert json.loads((tmp_path / "ppo" / "hydra_config.json").read_text())["merged_into_base"] == ["sft"]
    HydraModel.from_pretrained(tmp_path / "ppo", base=tmp_path / "sft_base", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"was trained on a base with \['sft'\] merged into it; this base has \[\]"):
        HydraModel.from_pretrained(tmp_path / "ppo", base=copy.deepcopy(ref))
    HydraModel.from_pretrained(tmp_path / "ppo", base=copy.deepcopy(ref), check_base=False)
    # In memory: merge, unpatch, patch again (the rlhf flow) keeps the history through the config.
    model = patch_model(copy.deepcopy(ref), adapters=("sft",), r=R)
    HydraModel(model).merge_adapter_into_base("sft")
    unpatch_model(model)
    assert merged_adapters(model) == ("sft",)
    assert patch_model(model, r=R).hydra_patch.merged == ("sft",)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])         # untied, tied, tied with Conv1D layers
def test_gathered_copy_is_the_plain_merged_model(arch):
    """gathered_copy (what Hydra-SFT returns under FSDP2; here one process, plain tensors): a new unpatched
    model of the architecture with the adapter folded in, its head tied where the config ties it."""
    from hydra_kernels.integrations import patch_model
    unpatched = make_model(arch)
    patched = patch_model(copy.deepcopy(unpatched), adapters=("sft",), r=R, alpha=ALPHA)
    randomize_adapters(patched)
    plain = ckpt.gathered_copy(patched, "sft")
    assert type(plain) is type(unpatched) and getattr(plain, "hydra_patch", None) is None
    assert getattr(plain.config, "hydra_merged_adapters") == ["sft"]
    ids, mask = batch()
    want = logits(merged_copy(unpatched, patched, "sft"), ids, mask)
    assert (logits(plain, ids, mask) - want).abs().max() < 1e-5
    tied = plain.config.tie_word_embeddings
    assert (plain.get_output_embeddings().weight is plain.get_input_embeddings().weight) == tied
    base = ckpt.gathered_copy(unpatched)                   # unpatched: the weights as they are
    assert torch.equal(logits(base, ids, mask), logits(unpatched, ids, mask))
