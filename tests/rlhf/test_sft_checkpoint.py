"""Hydra-SFT (full and LoRA-merged), its masks and saved result; checkpoint files, optimizer state, RNG;
checkpoints every N steps and a killed run resuming (also mid-epoch) to bitwise the same result."""
import json
import random
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hydra_kernels.rlhf.run as run_module
import hydra_kernels.rlhf.sft as sft_module
from hydra_kernels.nn import HydraLinear
from hydra_kernels.rlhf.checkpoint import (CheckpointSchedule, capture_rng, latest_checkpoint, list_checkpoints,
                                           load_checkpoint, restore_rng, save_checkpoint)
from hydra_kernels.rlhf.config import SFTConfig, load_config
from hydra_kernels.rlhf.data import PreferencePair, SFTExample
from hydra_kernels.rlhf.sft import _demo_batch, _forward, _lm_logprob_sum, evaluate_pairs, hydra_sft, load_sft
from tests._util import kill_job_when
from tests.rlhf._tiny import CharTokenizer, tiny_model


TOK = CharTokenizer()
RNG = random.Random(0)
DEMOS = [SFTExample(f"{a}+{b}=", str(a + b)) for a in range(8) for b in range(5)]
# Chosen answers are numbers, rejected ones are not: separable within a few dozen steps.
PAIRS = [PreferencePair(f"{a}+{b}=", str(a + b), RNG.choice(["+", "==", " +", "+="])) for a in range(8) for b in range(8)]


def _cfg(tmp_path, mode, *extra):
    return load_config(SFTConfig, None, [f"mode={mode}", "epochs=3", "batch_size=8", "lr=0.01", "lora.r=4",
                                         "lora.alpha=8", "run.progress=false", f"run.output_dir={tmp_path}",
                                         "data.eval_fraction=0.25", *extra])


def test_full_sft_learns_lm_and_reward_and_saves(tmp_path):
    model = tiny_model(len(TOK))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = hydra_sft(model, TOK, DEMOS, PAIRS, _cfg(tmp_path, "full"))
    h = res.history
    assert h[-1]["train/lm_loss"] < h[0]["train/lm_loss"]
    assert res.metrics["eval/reward_accuracy"] >= 0.9 and res.metrics["eval/reward_margin"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    loaded, head = load_sft(res.output_dir)
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(head.weight, res.reward_head.weight) and torch.equal(head.bias, res.reward_head.bias)
    again = evaluate_pairs(loaded, head, TOK, PAIRS[:16], _cfg(tmp_path, "full"))
    ref = evaluate_pairs(model, res.reward_head, TOK, PAIRS[:16], _cfg(tmp_path, "full"))
    assert again == pytest.approx(ref, rel=1e-5)


def test_lora_sft_is_merged_into_the_base(tmp_path):
    model = tiny_model(len(TOK))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(tmp_path, "lora", "epochs=1")
    seen = {}
    eval_pairs = PAIRS[:12]
    # The callback's evaluation runs with the adapter switched on, before the merge.
    res = hydra_sft(model, TOK, DEMOS, PAIRS[12:], cfg, eval_pairs=eval_pairs,
                    callback=lambda e, m: seen.update(m))
    assert not any(isinstance(m, HydraLinear) for m in model.modules())
    assert set(model.state_dict()) == set(before)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)      # only the adapted projections
    after = evaluate_pairs(model, res.reward_head, TOK, eval_pairs, cfg)
    assert after["lm_loss"] == pytest.approx(seen["eval/lm_loss"], abs=1e-4)
    assert after["reward_margin"] == pytest.approx(seen["eval/reward_margin"], abs=1e-4)


def test_lm_loss_counts_response_tokens_only():
    model = tiny_model(len(TOK))
    cfg = SFTConfig()
    batch = _demo_batch(TOK, DEMOS[:3], cfg)
    with torch.no_grad():
        lp, n = _lm_logprob_sum(model, _forward(model, batch), batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits.float()
    assert n == sum(len(e.completion) + 1 for e in DEMOS[:3])        # completion characters + EOS
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    assert lp.item() == pytest.approx(float((logp * batch.loss_mask[:, 1:]).sum()), rel=1e-5)


def test_failed_sft_saves_nothing(tmp_path):
    def boom(epoch, metrics):
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError, match="interrupted"):
        hydra_sft(tiny_model(len(TOK)), TOK, DEMOS[:8], PAIRS[:8], _cfg(tmp_path, "full", "epochs=1"), callback=boom)
    assert not (tmp_path / "final").exists()
    with pytest.raises(ValueError, match="demonstrations"):
        hydra_sft(tiny_model(len(TOK)), TOK, [], [], _cfg(tmp_path, "full"))


# ------------------------------------------------------------------------------------------ checkpoints
def _trained_optimizer(steps=3):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([w, b], lr=0.1, weight_decay=0.01)
    for _ in range(steps):
        opt.zero_grad()
        ((w.sum(0) * b) ** 2).sum().backward()
        opt.step()
    return {"w": w, "b": b}, opt


def test_checkpoint_round_trip_continues_identically(tmp_path):
    params, opt = _trained_optimizer()
    save_checkpoint(tmp_path, 3, params, opt, {"variant": "hydra"}, {"kl_ctl": {"value": 0.1}})
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck.step == 3 and ck.config == {"variant": "hydra"} and ck.trainer_state["kl_ctl"]["value"] == 0.1
    p2 = {k: torch.nn.Parameter(v.clone()) for k, v in ck.params.items()}
    opt2 = torch.optim.AdamW([p2["w"], p2["b"]], lr=0.5)
    opt2.load_state_dict(ck.optimizer_state)
    for ps, o in ((params, opt), (p2, opt2)):
        o.zero_grad()
        ((ps["w"].sum(0) * ps["b"]) ** 2).sum().backward()
        o.step()
    assert torch.equal(params["w"], p2["w"]) and torch.equal(params["b"], p2["b"])
    assert (tmp_path / "step-00000003" / "tensors.safetensors").is_file()
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/*.bin"))


def test_only_complete_checkpoints_count_and_old_ones_are_pruned(tmp_path):
    params, opt = _trained_optimizer(1)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, params, opt, {}, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    (tmp_path / "step-00000009").mkdir()                      # a kill before state.json was written
    (tmp_path / ".step-00000010.tmp-x").mkdir()               # a kill mid-write
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    with torch.no_grad():
        params["w"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        save_checkpoint(tmp_path, 4, params, opt, {}, {})
    assert latest_checkpoint(tmp_path).name == "step-00000003"


def test_rng_states_restore():
    import numpy as np
    meta, tensors = capture_rng()
    a = (torch.rand(3), random.random(), np.random.rand())
    restore_rng(meta, tensors)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# --------------------------------------------------------------- Hydra-SFT checkpoints every N steps, resume
# DEMOS[:32] and the 24 training pairs of PAIRS[:32] make 4 steps per epoch at batch_size=8.
def _job(out, mode, *extra, callback=None):
    return hydra_sft(tiny_model(len(TOK)), TOK, DEMOS[:32], PAIRS[:32], _cfg(out, mode, *extra), callback=callback)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The output dir of an uninterrupted run that writes no checkpoints (one per configuration)."""
    done = {}

    def get(mode, *extra):
        if (mode, *extra) not in done:
            out = tmp_path_factory.mktemp("straight")
            _job(out, mode, *extra, "run.checkpoint_every=0")
            done[(mode, *extra)] = out
        return done[(mode, *extra)]
    return get


def _assert_same_run(a: Path, b: Path):
    """Bitwise the same final weights and reward head, metrics history and final metrics."""
    names = sorted(p.name for p in (a / "final").glob("*.safetensors"))
    assert "reward_head.safetensors" in names and len(names) >= 2
    assert names == sorted(p.name for p in (b / "final").glob("*.safetensors"))
    for name in names:
        ta, tb = load_file(str(a / "final" / name)), load_file(str(b / "final" / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)

    def lines(path):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    history = lines(a / "metrics.jsonl")
    assert history and history == lines(b / "metrics.jsonl")
    assert json.loads((a / "final/sft.json").read_text())["metrics"] == \
        json.loads((b / "final/sft.json").read_text())["metrics"]


def test_sft_checkpoint_every_counts_loop_steps(tmp_path, monkeypatch):
    saved = []
    real = run_module.save_checkpoint
    monkeypatch.setattr(run_module, "save_checkpoint", lambda root, step, *a, **k: saved.append(step) or
                        real(root, step, *a, **k))
    real_rewards = sft_module._rewards
    calls = []

    def nan_at_step_2(head, h):              # training steps compute rewards with grad, evaluation without
        r = real_rewards(head, h)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 2:
                return r * float("nan")
        return r
    monkeypatch.setattr(sft_module, "_rewards", nan_at_step_2)
    with pytest.warns(RuntimeWarning, match="epoch 1 step 2: non-finite loss"):
        res = _job(tmp_path / "a", "full", "epochs=2", "run.checkpoint_every=2")
    # Every 2 loop steps over both epochs (the skipped step 2 counts), and after the last step (8).
    assert saved == [2, 4, 6, 8] and res.history[-1]["skipped/nonfinite_loss"] == 1
    root = tmp_path / "a/checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-00000006", "step-00000008"]   # keep_checkpoints=2
    at6 = load_checkpoint(root / "step-00000006").trainer_state
    assert len(at6["history"]) == 1 and at6["epoch_partial"]["counted"] == 2
    at8 = load_checkpoint(root / "step-00000008").trainer_state
    assert len(at8["history"]) == 2 and at8["epoch_partial"] is None and at8["skipped"] == 1
    monkeypatch.setattr(sft_module, "_rewards", real_rewards)

    saved.clear()
    _job(tmp_path / "b", "full", "epochs=1", "run.checkpoint_every=0")       # the last step is always saved
    assert saved == [4] and (tmp_path / "b/final").is_dir()
    saved.clear()
    _job(tmp_path / "c", "full", "epochs=1", "run.checkpoint_every=1", "run.keep_checkpoints=5")
    assert saved == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(tmp_path / "c/checkpoints")] == [f"step-0000000{i}" for i in (1, 2, 3, 4)]


def test_a_failed_final_save_says_where_and_resumes_without_training(tmp_path, monkeypatch, straight):
    import safetensors.torch

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)    # save_sft's reward_head.safetensors
    with pytest.raises(OSError, match=rf"run.output_dir: writing '{tmp_path}/final' failed .*No space left on "
                                      rf"device.* checkpointed after its last step \('.*step-00000008'\): run it "
                                      rf"again with run.resume=true"):
        _job(tmp_path, "lora", "epochs=2")
    monkeypatch.undo()
    assert not (tmp_path / "final").exists()
    with_grad = []
    real = sft_module._lm_logprob_sum
    monkeypatch.setattr(sft_module, "_lm_logprob_sum", lambda *a: with_grad.append(torch.is_grad_enabled()) or
                        real(*a))
    _job(tmp_path, "lora", "epochs=2")
    monkeypatch.undo()
    assert not with_grad                     # no training step again (the metrics come from the history)
    _assert_same_run(straight("lora", "epochs=2"), tmp_path)


def test_sft_resume_refuses_changed_settings(tmp_path):
    _job(tmp_path, "lora", "epochs=1", "run.checkpoint_every=3")         # leaves the checkpoint of step 3
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.01 there, 0.02 here\)"):
        _job(tmp_path, "lora", "epochs=2", "lr=0.02", "run.checkpoint_every=3")
    with pytest.raises(ValueError, match=r"mode: 'lora' there, 'full' here"):
        _job(tmp_path, "full", "epochs=2", "run.checkpoint_every=3")


def test_checkpoint_schedule_by_count_and_by_time():
    now = [0.0]
    sched = CheckpointSchedule(every=3, minutes=0.5, clock=lambda: now[0])
    assert [d for d in range(1, 7) if sched.due(d)] == [3, 6]           # no time has passed
    now[0] = 29.0
    assert not sched.due(1)
    now[0] = 30.0
    assert sched.due(1)                                                  # 30 s since the start
    sched.saved()
    now[0] = 59.0
    assert not sched.due(4) and sched.due(6)
    assert not any(CheckpointSchedule(0, 0.0, clock=lambda: 1e9).due(d) for d in range(1, 10))


def test_sft_checkpoints_by_time(tmp_path, monkeypatch):
    saved = []
    real = run_module.save_checkpoint
    monkeypatch.setattr(run_module, "save_checkpoint", lambda root, step, *a, **k: saved.append(step) or
                        real(root, step, *a, **k))
    # Any time at all is "long enough": every step checkpoints, with no count set (the last one always does).
    _job(tmp_path, "full", "epochs=1", "run.checkpoint_every=0", "run.checkpoint_minutes=1e-12")
    assert saved == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="run.checkpoint_minutes"):
        _cfg(tmp_path, "full", "run.checkpoint_minutes=-1")


@pytest.mark.parametrize("every, kill, start", [(3, 3, 3), (2, 4, 4), (3, "final", 8)],
                         ids=["mid-first-epoch", "epoch-boundary", "before-final"])
def test_sft_resumes_at_any_step_bitwise(tmp_path, monkeypatch, straight, every, kill, start):
    extra = ("epochs=2", f"run.checkpoint_every={every}")
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        if kill == "final":                  # after the checkpoint of the last step (8), before final is written
            def killing_final(*a, **k):
                raise KeyboardInterrupt("killed")
            m.setattr(sft_module, "save_sft", killing_final)
        else:
            real = run_module.save_checkpoint

            def killing(root, step, *a, **k):
                path = real(root, step, *a, **k)
                if step == kill:
                    raise KeyboardInterrupt("killed")
                return path
            m.setattr(run_module, "save_checkpoint", killing)
        with pytest.raises(KeyboardInterrupt):
            _job(run, "lora", *extra)
    assert latest_checkpoint(run / "checkpoints").name == f"step-{start:08d}" and not (run / "final").exists()

    bars = []
    import tqdm.auto

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            if str(k.get("desc", "")).startswith("Hydra-SFT"):
                bars.append(k)
            super().__init__(*a, **k)
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    resumed = _job(run, "lora", *extra, "run.progress=true")
    assert [(b["initial"], b["total"]) for b in bars] == [(start, 8)]
    assert len(resumed.history) == 2
    _assert_same_run(run, straight("lora", "epochs=2"))


def _run_until_killed(out: Path, *args):
    """Run this file as a job (see the bottom) that hangs at a given point, then SIGKILL it there."""
    kill_job_when(Path(f"{out}.hanging"), "tests.rlhf.test_sft_checkpoint", str(out), *args)


@pytest.mark.parametrize("when", ["2", "final"], ids=["after-mid-epoch-checkpoint", "before-final"])
def test_sft_resume_after_sigkill_matches_uninterrupted_run(tmp_path, straight, when):
    # One epoch of 4 steps, a checkpoint every 2: one in the middle of the epoch, one after its last step.
    killed = tmp_path / "killed"
    extra = ("epochs=1", "run.checkpoint_every=2")
    _run_until_killed(killed, "full", when, *extra)
    want = ["step-00000002"] + (["step-00000004"] if when == "final" else [])   # the last step, before final
    assert [p.name for p in list_checkpoints(killed / "checkpoints")] == want
    assert not (killed / "final").exists()               # nothing half-trained is saved as if complete
    _job(killed, "full", *extra)
    _assert_same_run(killed, straight("full", "epochs=1"))


if __name__ == "__main__":
    # The job of the SIGKILL test: python -m tests.rlhf.test_sft_checkpoint OUT MODE WHEN [key=value ...]
    # hangs right after writing the checkpoint of step WHEN, or (WHEN=final) before writing final.
    out, mode, when, *extra = sys.argv[1:]

    def hang():
        Path(f"{out}.hanging").touch()
        time.sleep(600)                      # the test kills us here

    if when == "final":
        def hanging_final(*a, **k):
            hang()
        sft_module.save_sft = hanging_final
    else:
        real_save = run_module.save_checkpoint

        def hanging(root, step, *a, **k):
            path = real_save(root, step, *a, **k)
            if step == int(when):
                hang()
            return path
        run_module.save_checkpoint = hanging
    _job(out, mode, *extra)
    print("DONE", flush=True)
