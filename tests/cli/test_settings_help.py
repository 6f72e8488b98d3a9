"""`hydra-rlhf sft|ppo --help` lists every setting from the config dataclasses; a dashed setting gets a hint."""
import dataclasses
import typing

import pytest

from hydra_kernels.cli import main
from hydra_kernels.rlhf.config import PPOConfig, SFTConfig, settings
from tests.cli._local import cli


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _leaves(cls, prefix=""):
    """Every non-section field of config dataclass `cls`, dotted, with its dataclasses.Field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


@pytest.mark.parametrize("command, cls", [("sft", SFTConfig), ("ppo", PPOConfig)])
def test_help_lists_every_field_with_default_type_and_meaning(capsys, command, cls):
    out = _help(capsys, command)
    flat = " ".join(out.split())
    leaves = list(_leaves(cls))
    assert len(leaves) > 30
    for (name, f), (row_name, accepted, default, _) in zip(leaves, settings(cls)):
        assert row_name == name
        assert f"{name}={default}" in out, name
        assert f"{name}={default} {accepted} {' '.join(f.metadata['help'].split())}" in flat, name


def test_help_shows_the_stage_defaults_and_choices(capsys):
    out = " ".join(_help(capsys, "ppo").split())
    assert "run.output_dir=runs/hydra-ppo str checkpoints, metrics and final/ go here" in out
    assert "variant=hydra hydra | j-hydra | lora | full" in out
    assert "kl_estimator=k1 k1 | k2 | k3 | full" in out
    assert "run.device=auto auto, cpu, cuda or cuda:N" in out
    assert "run.output_dir=runs/hydra-sft" in " ".join(_help(capsys, "sft").split())


@pytest.mark.parametrize("argv, meant", [
    (["ppo", "--steps", "3", "model.path=m"], "steps=3"),
    (["ppo", "model.path=m", "--steps=3"], "steps=3"),
    (["ppo", "--lora.r", "8"], "lora.r=8"),
    (["sft", "--data.max-len", "64", "--epochs", "2"], "data.max_len=64 epochs=2"),
    (["sft", "--data-max-len=64"], "data.max_len=64"),
    (["sft", "--epochs", "data.max_len=64"], "epochs=..."),
])
def test_a_dashed_setting_suggests_key_value(capsys, argv, meant):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "unrecognized arguments: --" in err and f"(settings are key=value: did you mean {meant}?)" in err


def test_other_unknown_options_get_no_hint(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--merge-to", "y", "--steps", "3"])          # SFT has no steps setting
    err = capsys.readouterr().err
    assert "unrecognized arguments: --merge-to --steps" in err and "did you mean" not in err


def test_cli_refuses_a_config_file_with_a_duplicate_key(tmp_path):
    (tmp_path / "ppo.yaml").write_text("steps: 2\nlr: 0.001\nsteps: 3\n")
    proc = cli("ppo", "--config", tmp_path / "ppo.yaml", "model.path=x", "data.prompt_path=y")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ppo.yaml: key 'steps' is given twice (line 3)" in proc.stderr
