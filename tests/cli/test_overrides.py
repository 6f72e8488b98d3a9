"""key=value overrides of string settings (paths, names) keep the text as typed: as YAML, `runs/exp #2` would be
runs/exp ('#' starts a comment), 007 would be 7, yes True and 0x10 16; `demo --out` likewise."""
import sys

import pytest

from hydra_kernels import rlhf
from tests.cli._local import SFT_SMALL, cli, make_local


@pytest.mark.parametrize("text", ["runs/exp #2", "007", "yes", "0x10", "1_000", "a #b # c", "runs/#1"])
def test_string_settings_keep_the_text(text):
    for cls in (rlhf.SFTConfig, rlhf.PPOConfig):
        cfg = rlhf.load_config(cls, None, [f"run.output_dir={text}", f"data.prompt_path={text}",
                                           f"model.path={text}", f"run.metrics_file={text}"])
        assert (cfg.run.output_dir, cfg.data.prompt_path, cfg.model.path, cfg.run.metrics_file) == (text,) * 4
        assert rlhf.apply_overrides(cls(), [f"run.output_dir={text}"]).run.output_dir == text


def test_other_values_are_still_yaml():
    cfg = rlhf.load_config(rlhf.PPOConfig, None, ["lora.target_modules=[q_proj,v_proj]", "lr=1e-3", "steps=7",
                                                  "run.resume=false", "model.tokenizer_path=null",
                                                  "data.sft_path='quoted #1'", "critic_lr=null"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.lr == 1e-3 and cfg.steps == 7
    assert cfg.run.resume is False and cfg.model.tokenizer_path is None and cfg.critic_lr is None
    assert cfg.data.sft_path == "quoted #1"
    with pytest.raises(ValueError, match="run.output_dir"):
        rlhf.load_config(rlhf.SFTConfig, None, ["run.output_dir=null"])
    with pytest.raises(ValueError, match="did you mean 'run.output_dir'"):
        rlhf.load_config(rlhf.SFTConfig, None, ["run.outptu_dir=x #1"])


def test_cli_output_dir_with_a_hash(tmp_path):
    paths = make_local(tmp_path)
    out = tmp_path / "exp #2"
    proc = cli("sft", f"model.path={paths['model']}", f"data.sft_path={paths['demos']}", f"run.output_dir={out}",
               *SFT_SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "final" / "sft.json").is_file() and not (tmp_path / "exp").exists()


def test_demo_out_keeps_the_text():
    from hydra_kernels.cli import build_parser
    from hydra_kernels.rlhf.demo import run as demo_run
    captured = {}
    real = demo_run.run_demo
    demo_run.run_demo = lambda cfg, progress=True, stream=None: captured.setdefault("cfg", cfg)
    try:
        args = build_parser().parse_args(["demo", "--quick", "--out", "runs/demo #2", "--seed", "3"])
        args.stdout = sys.stdout                     # what main() sets: the stream the result goes to
        args.func(args)
    finally:
        demo_run.run_demo = real
    assert captured["cfg"].out == "runs/demo #2" and captured["cfg"].seed == 3
