"""Hydra-SFT's records every logging_steps / eval_steps, the eval LM loss on held-out demonstrations, and a
resumed run that logs them writing bitwise the same metrics and weights."""
import json

import pytest
import torch
from safetensors.torch import load_file

import hydra_kernels.rlhf.run as run_module
from hydra_kernels.rlhf.config import SFTConfig, load_config
from hydra_kernels.rlhf.data import PreferencePair, SFTExample
from hydra_kernels.rlhf.sft import evaluate_demonstrations, hydra_sft
from tests.rlhf._tiny import CharTokenizer, tiny_model

TOK = CharTokenizer()
DEMOS = [SFTExample(f"{a}+{b}=", str(a + b)) for a in range(4) for b in range(4)]        # 16
PAIRS = [PreferencePair(f"{a}+{b}=", str(a + b), "+") for a in range(4) for b in range(3)]   # 12


def _cfg(out, *extra):
    return load_config(SFTConfig, None, ["batch_size=4", "lr=0.01", "epochs=2", "data.eval_fraction=0.25",
                                         "data.sft_eval_fraction=0.25", "logging_steps=2", "eval_steps=3",
                                         "run.progress=false", "run.checkpoint_minutes=0",
                                         f"run.output_dir={out}", *extra])


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_records_every_logging_and_eval_steps_and_held_out_demonstrations(tmp_path):
    res = hydra_sft(tiny_model(len(TOK)), TOK, DEMOS, PAIRS, _cfg(tmp_path))
    rows = _lines(tmp_path / "metrics.jsonl")
    assert rows == res.history
    # 12 demonstrations and 9 pairs train: 3 steps per epoch, 6 in all. Logging records at steps 2, 4 and 6;
    # eval_steps=3 falls on the epochs' ends, whose records (epoch: an int) carry the evaluation.
    epochs = [r for r in rows if isinstance(r["epoch"], int)]
    assert [r["step"] for r in epochs] == [3, 6]
    assert all({"eval/reward_accuracy", "train/lm_loss"} <= r.keys() for r in epochs)
    logged = [r for r in rows if r not in epochs]
    assert [r["step"] for r in logged] == [2, 4, 6]
    for r in logged:
        assert {"lr", "train/lm_loss", "train/bt_loss", "train/reward_accuracy"} <= r.keys()
        assert r["epoch"] == pytest.approx(r["step"] / 3, abs=1e-4)
    for r in epochs:
        assert r["eval/demo_lm_loss"] > 0 and r["lr"] == pytest.approx(0.01)
    assert res.metrics["eval/demo_lm_loss"] == epochs[-1]["eval/demo_lm_loss"]


def test_eval_steps_inside_an_epoch_and_the_held_out_loss_is_that_of_the_held_out_demos(tmp_path):
    model = tiny_model(len(TOK))
    held = DEMOS[:4]
    res = hydra_sft(model, TOK, DEMOS[4:], PAIRS, _cfg(tmp_path, "logging_steps=0", "eval_steps=2", "epochs=1"),
                    eval_demonstrations=held)
    mid = [r for r in res.history if r["step"] == 2]
    assert len(mid) == 1 and set(mid[0]) == {"step", "epoch", "eval/lm_loss", "eval/reward_accuracy",
                                             "eval/reward_margin", "eval/demo_lm_loss", "world_size"}
    want = evaluate_demonstrations(res.model, TOK, held, _cfg(tmp_path))["lm_loss"]
    assert res.metrics["eval/demo_lm_loss"] == pytest.approx(want, rel=1e-5)


def test_resumed_run_with_step_records_is_bitwise_the_same(tmp_path):
    straight = tmp_path / "straight"
    hydra_sft(tiny_model(len(TOK)), TOK, DEMOS, PAIRS, _cfg(straight))
    run = tmp_path / "run"
    real = run_module.save_checkpoint

    def killing(root, step, *a, **k):
        path = real(root, step, *a, **k)
        if step == 5:                    # after the logging record of step 4, inside a logging window
            raise KeyboardInterrupt("killed")
        return path
    run_module.save_checkpoint = killing
    try:
        with pytest.raises(KeyboardInterrupt):
            hydra_sft(tiny_model(len(TOK)), TOK, DEMOS, PAIRS, _cfg(run, "run.checkpoint_every=1"))
    finally:
        run_module.save_checkpoint = real
    hydra_sft(tiny_model(len(TOK)), TOK, DEMOS, PAIRS, _cfg(run, "run.checkpoint_every=1"))
    assert _lines(run / "metrics.jsonl") == _lines(straight / "metrics.jsonl")
    for name in ("model.safetensors", "reward_head.safetensors"):
        a, b = load_file(str(run / "final" / name)), load_file(str(straight / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_new_settings_are_checked():
    with pytest.raises(ValueError, match="^logging_steps:"):
        load_config(SFTConfig, None, ["logging_steps=-1"])
    with pytest.raises(ValueError, match="^data.sft_eval_fraction:"):
        load_config(SFTConfig, None, ["data.sft_eval_fraction=1"])
