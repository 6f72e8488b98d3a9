"""Review: config type validation names the field for every field and every value.

1. An int field given an infinite or NaN number (`epochs=.inf`, `epochs=1e400`, `epochs=.nan`) raised
   OverflowError / a ValueError without the field's name (the CLI turns only ValueError into a one-line error).
2. Sections built directly in Python skipped the type checks of some fields: RunConfig(resume="false") was a
   truthy string (the run resumed), and progress / metrics_file / the model and data paths were not checked.
"""
import pytest

from hydra_kernels.rlhf.config import DataConfig, ModelConfig, PPOConfig, RunConfig, SFTConfig, load_config


@pytest.mark.parametrize("value", [".inf", "-.inf", "1e400", ".nan"])
def test_non_finite_int_names_the_field(value):
    with pytest.raises(ValueError, match="^epochs: must be an int"):
        load_config(SFTConfig, None, [f"epochs={value}"])
    with pytest.raises(ValueError, match="^lora.r: must be an int"):
        load_config(PPOConfig, None, [f"lora.r={value}"])


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
