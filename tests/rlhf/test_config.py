"""rlhf.config: loading, overrides, the checks declared on the dataclasses' fields, and the settings listing."""
import dataclasses
import typing
from dataclasses import dataclass

import pytest
import torch

from hydra_kernels.rlhf import config
from hydra_kernels.rlhf.config import (DataConfig, LoRAConfig, ModelConfig, PPOConfig, RunConfig, SFTConfig,
                                       apply_overrides, config_from_dict, config_to_dict, load_config, save_config,
                                       setting, settings, settings_help)


# ----------------------------------------------------------------------------------- loading and overrides
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


def test_exponent_floats_are_numbers_in_files_and_pairs(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as a string; the config's loader reads it as a float, as YAML 1.2 and JSON do.
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nlora: {alpha: 5E+1}\n")
    cfg = load_config(PPOConfig, tmp_path / "c.yaml", ["kl_coef=2e-2", "critic_lr=.5e-4"])
    assert (cfg.lr, cfg.lora.alpha, cfg.kl_coef, cfg.critic_lr) == (1e-3, 50.0, 2e-2, 0.5e-4)
    assert config.parse_overrides(["x=1e-3", "y=007"]) == {"x": 1e-3, "y": 7}


def test_sections_as_mappings_take_the_stage_defaults():
    ppo, sft = PPOConfig(lora={"r": 8}, run={"seed": 2}), SFTConfig(run={"seed": 2})
    assert ppo.lora == LoRAConfig(r=8) and ppo.run.output_dir == "runs/hydra-ppo" and ppo.run.seed == 2
    assert sft.run.output_dir == "runs/hydra-sft"
    assert load_config(SFTConfig, None, ["run.seed=4"]).run.output_dir == "runs/hydra-sft"
    with pytest.raises(ValueError, match=r"^lora.alpah: unknown field of LoRAConfig \(did you mean 'lora.alpha'\?\)"):
        PPOConfig(lora={"alpah": 8})
    with pytest.raises(ValueError, match="^lora: must be a LoRAConfig or a mapping of its fields, got int"):
        PPOConfig(lora=8)


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


def test_new_settings_are_checked():
    with pytest.raises(ValueError, match="^logging_steps:"):
        load_config(SFTConfig, None, ["logging_steps=-1"])
    with pytest.raises(ValueError, match="^data.sft_eval_fraction:"):
        load_config(SFTConfig, None, ["data.sft_eval_fraction=1"])


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


def test_bad_yaml_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("lr: [1,\nsteps: 2\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML") as e:
        load_config(PPOConfig, tmp_path / "bad.yaml")
    assert "\n" not in str(e.value)


def test_binary_config_file_names_the_file(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ValueError, match=r"^config: .*c\.yaml is not a UTF-8 text file"):
        load_config(PPOConfig, tmp_path / "c.yaml")


@pytest.mark.parametrize("name, text, key", [
    ("c.json", '{"lr": 1e-3, "steps": 2, "lr": 1e-2}', "lr"),
    ("c.json", '{"lora": {"r": 4, "r": 8}}', "r"),
    ("c.yaml", "lr: 0.001\nsteps: 2\nlr: 0.01\n", "lr"),
    ("c.yml", "lora:\n  r: 4\n  alpha: 8\n  r: 8\n", "r"),
    ("c.yaml", "lora: {r: 4, r: 8}\n", "r"),
])
def test_duplicate_keys_in_files_are_refused(tmp_path, name, text, key):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"^config: .*{name}: key '{key}' is given twice"):
        load_config(PPOConfig, tmp_path / name)


def test_duplicate_keys_give_the_yaml_line(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.001\nsteps: 2\nlr: 0.01\n")
    with pytest.raises(ValueError, match=r"'lr' is given twice \(line 3\)"):
        config.read_config_file(tmp_path / "c.yaml")


# -------------------------------------------------------------------------------------------- field checks
@pytest.mark.parametrize("value", [".inf", "-.inf", "1e400", ".nan"])
def test_non_finite_int_names_the_field(value):
    with pytest.raises(ValueError, match="^epochs: must be an int"):
        load_config(SFTConfig, None, [f"epochs={value}"])
    with pytest.raises(ValueError, match="^lora.r: must be an int"):
        load_config(PPOConfig, None, [f"lora.r={value}"])


@pytest.mark.parametrize("field", ["lr", "kl_coef", "lora.alpha", "temperature", "top_p", "critic_lr",
                                   "missing_eos_penalty", "reward_clip", "kl_target", "run.checkpoint_minutes"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_non_finite_floats_are_refused(field, value):
    with pytest.raises(ValueError, match=f"^{field}: must be a finite number"):
        load_config(PPOConfig, None, [f"{field}={value}"])


def test_non_finite_floats_are_refused_in_python_and_files(tmp_path):
    with pytest.raises(ValueError, match="^temperature: must be a finite number, got inf"):
        PPOConfig(temperature=float("inf"))
    with pytest.raises(ValueError, match="^lora.alpha: must be a finite number, got nan"):
        SFTConfig(lora=LoRAConfig(alpha=float("nan")))
    (tmp_path / "c.json").write_text('{"kl_coef": Infinity}')
    with pytest.raises(ValueError, match="^kl_coef: must be a finite number"):
        load_config(PPOConfig, tmp_path / "c.json")
    with pytest.raises(ValueError, match="^lr: must be a finite number"):
        SFTConfig(lr=10 ** 400)


def test_integers_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"^run.seed: must be <= 18446744073709551615, got 18446744073709551616"):
        load_config(PPOConfig, None, [f"run.seed={2 ** 64}"])
    with pytest.raises(ValueError, match=r"^lora.r: must be <= 2147483647, got 1000000000000$"):
        load_config(SFTConfig, None, [f"lora.r={10 ** 12}"])
    for field in ("steps", "batch_size", "max_new_tokens", "data.max_len", "run.keep_checkpoints"):
        with pytest.raises(ValueError, match=f"^{field}: must be <= 2147483647"):
            load_config(PPOConfig, None, [f"{field}={2 ** 40}"])
    with pytest.raises(ValueError, match="^run.seed: must be >= 0"):
        RunConfig(seed=-1).validate("run.")


def test_seed_range_is_torchs():
    assert load_config(PPOConfig, None, [f"run.seed={config.SEED_MAX}"]).run.seed == config.SEED_MAX
    torch.Generator().manual_seed(config.SEED_MAX)
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(config.SEED_MAX + 1)


@pytest.mark.parametrize("device", ["cuda:banana", "cuda:", "cuda:0:1", "npu", "CPU", "cuda 0", "cuda:-1", " cpu"])
def test_malformed_devices_are_refused(device):
    with pytest.raises(ValueError, match=r"^run.device: must be auto, cpu, cuda or cuda:N, got "):
        load_config(PPOConfig, None, [f"run.device='{device}'"])
    with pytest.raises(ValueError, match=r"^run.device: "):
        SFTConfig(run=RunConfig(device=device))


def test_wellformed_devices_pass():
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert load_config(SFTConfig, None, [f"run.device={device}"]).run.device == device


@pytest.mark.parametrize("make, message", [
    (lambda: PPOConfig(lora=LoRAConfig(r=True)), "^lora.r: must be an int, got True"),
    (lambda: PPOConfig(lora=LoRAConfig(alpha=-1.0)), "^lora.alpha: must be > 0, got -1.0"),
    (lambda: PPOConfig(lora=LoRAConfig(alpha="16")), "^lora.alpha: must be a number, got '16'"),
    (lambda: PPOConfig(temperature="0.7"), "^temperature: must be a number, got '0.7'"),
    (lambda: PPOConfig(adaptive_kl=1), "^adaptive_kl: must be a bool, got 1"),
    (lambda: SFTConfig(epochs="3"), "^epochs: must be an int, got '3'"),
    (lambda: SFTConfig(lora=LoRAConfig(target_modules=[])), r"^lora.target_modules: must be all-linear or a list"),
    (lambda: SFTConfig(lora=LoRAConfig(target_modules=["q", ""])), r"^lora.target_modules: must be all-linear or a"),
    (lambda: SFTConfig(run=RunConfig(output_dir="")), "^run.output_dir: must be a non-empty string"),
])
def test_values_are_not_converted_from_other_types(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_lossless_numbers_are_normalised():
    cfg = SFTConfig(epochs=2.0, lr=1, lora=LoRAConfig(target_modules=("q_proj",)))
    assert (cfg.epochs, type(cfg.epochs), cfg.lr, type(cfg.lr)) == (2, int, 1.0, float)
    assert cfg.lora.target_modules == ["q_proj"]


@pytest.mark.parametrize("make, field", [
    (lambda: SFTConfig(run=RunConfig(resume="false")), "run.resume"),
    (lambda: SFTConfig(run=RunConfig(progress=None)), "run.progress"),
    (lambda: SFTConfig(run=RunConfig(metrics_file=None)), "run.metrics_file"),
    (lambda: SFTConfig(run=RunConfig(metrics_file="")), "run.metrics_file"),
    (lambda: SFTConfig(model=ModelConfig(path=3)), "model.path"),
    (lambda: SFTConfig(model=ModelConfig(tokenizer_path=["t"])), "model.tokenizer_path"),
    (lambda: PPOConfig(data=DataConfig(prompt_path=1)), "data.prompt_path"),
    (lambda: SFTConfig(data=DataConfig(sft_path=["a.jsonl"])), "data.sft_path"),
    (lambda: SFTConfig(data=DataConfig(preference_path=b"p.jsonl")), "data.preference_path"),
])
def test_directly_built_sections_are_type_checked(make, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        make()


def test_valid_values_still_pass():
    cfg = SFTConfig(run=RunConfig(resume=False, progress=False, metrics_file="m.jsonl"),
                    model=ModelConfig(path="m", tokenizer_path=None), data=DataConfig(sft_path="s.jsonl"))
    assert cfg.run.resume is False and cfg.model.path == "m"
    assert load_config(SFTConfig, None, ["epochs=2.0", "run.resume=no"]).epochs == 2


# ------------------------------------------------------------------------------------------------ listing
def _dotted_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _dotted_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def test_settings_list_every_field_with_help_and_default():
    for cls in (SFTConfig, PPOConfig):
        rows = {name: (accepted, default, help_) for name, accepted, default, help_ in settings(cls)}
        fields = dict(_dotted_fields(cls))
        assert list(rows) == list(fields)
        for name, f in fields.items():
            assert rows[name][2] and rows[name][2] == f.metadata["help"], name
    rows = {name: (accepted, default) for name, accepted, default, _ in settings(PPOConfig)}
    assert rows["variant"] == ("hydra | j-hydra | lora | full", "hydra")
    assert rows["top_p"] == ("float in (0, 1]", "1.0") and rows["lora.r"] == ("int >= 1", "16")
    assert rows["critic_lr"] == ("float >= 0 | null", "null") and rows["run.output_dir"] == ("str", "runs/hydra-ppo")
    assert rows["data.eval_fraction"][0] == "float in [0, 1)" and rows["run.resume"] == ("bool", "true")
    assert dict((n, d) for n, _, d, _ in settings(SFTConfig))["run.output_dir"] == "runs/hydra-sft"


def test_a_new_field_is_listed_and_checked_by_itself():
    @dataclass
    class Extended(PPOConfig):
        warmup_rollouts: int = setting(3, "rollouts before the first update", ge=0, le=10)

    text = " ".join(settings_help(Extended, width=80).split())
    assert "warmup_rollouts=3 int in [0, 10] rollouts before the first update" in text
    assert config_from_dict(Extended, {"warmup_rollouts": 4}).warmup_rollouts == 4
    with pytest.raises(ValueError, match="^warmup_rollouts: must be <= 10, got 11"):
        load_config(Extended, None, ["warmup_rollouts=11"])


def test_settings_help_wraps_the_help_to_the_width():
    lines = settings_help(PPOConfig, width=70).splitlines()
    helps = [line for line in lines if line.startswith(" " * 6)]
    assert len(helps) > len(settings(PPOConfig)) and all(len(line) <= 70 for line in helps)
