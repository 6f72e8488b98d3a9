"""Hydra-SFT's checkpoints and resume: checkpoints every N steps and by time, which checkpoint a run resumes
from and what it may resume into, a failed final save, and a killed run (also mid-epoch, also by SIGKILL)
resuming to bitwise the same result."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hydra_kernels.rlhf.run as run_module
import hydra_kernels.rlhf.sft as sft_module
from hydra_kernels.rlhf.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from hydra_kernels.rlhf.config import SFTConfig, load_config
from hydra_kernels.rlhf.data import PreferencePair, SFTExample
from hydra_kernels.rlhf.sft import hydra_sft
from tests._util import kill_job_when
from tests.rlhf._tiny import tiny_model
from tests.rlhf.test_sft import DEMOS, PAIRS, TOK, _cfg


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

# ----------------------------------------------------------- which checkpoint a run resumes, and into what
FEW_DEMOS = [SFTExample(f"{a}+{b}=", str(a + b)) for a in range(4) for b in range(2)]      # 8: 2 steps/epoch
FEW_PAIRS = [PreferencePair(f"{a}+{b}=", str(a + b), "+") for a in range(4) for b in range(2)]


def _run(out, *extra):
    cfg = load_config(SFTConfig, None, ["batch_size=4", "lr=0.01", "data.eval_fraction=0", "run.progress=false",
                                        "run.checkpoint_minutes=0", f"run.output_dir={out}", *extra])
    return hydra_sft(tiny_model(len(TOK)), TOK, FEW_DEMOS, FEW_PAIRS, cfg)


# Pruning once deleted a fresh run's own checkpoint in an output_dir with an earlier run's higher steps.
def test_fresh_run_in_a_used_output_dir_resumes_its_own_checkpoint(tmp_path):
    _run(tmp_path, "epochs=3", "run.checkpoint_every=1")           # leaves step-5 and step-6 (of 6)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000005", "step-00000006"]
    # A fresh run (resume=false, another seed) killed after its checkpoint of step 1 ...
    real = run_module.save_checkpoint

    def killing(root, step, *a, **k):
        real(root, step, *a, **k)
        raise KeyboardInterrupt("killed")
    run_module.save_checkpoint = killing
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, "epochs=3", "run.checkpoint_every=1", "run.seed=1", "run.resume=false")
    finally:
        run_module.save_checkpoint = real
    # ... is continued from that checkpoint, not from the earlier run's step 6.
    last = latest_checkpoint(tmp_path / "checkpoints")
    assert last.name == "step-00000001" and load_checkpoint(last).config["run"]["seed"] == 1


# A resume with fewer epochs than the checkpoint has done would return weights trained longer than asked.
def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path):
    real = run_module.save_checkpoint

    def killing(root, step, *a, **k):
        path = real(root, step, *a, **k)
        if step == 3:
            raise KeyboardInterrupt("killed")
        return path
    run_module.save_checkpoint = killing
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, "epochs=2", "run.checkpoint_every=3")     # killed after step 3 of 4
    finally:
        run_module.save_checkpoint = real
    with pytest.raises(ValueError, match="^epochs: "):
        _run(tmp_path, "epochs=1", "run.checkpoint_every=3")
    assert not (tmp_path / "final").exists()
    res = _run(tmp_path, "epochs=2", "run.checkpoint_every=3")          # the same length resumes
    assert len(res.history) == 2



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
