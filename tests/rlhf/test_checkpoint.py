"""Training checkpoints (rlhf.checkpoint): round trips that continue bitwise (AdamW, SlicedLRAdamW, RNG), which
checkpoints count and which are pruned, the schedule by count and by time, and values read back checked against
the run's own config: unreadable files, edited optimizer settings, optimizer state of the wrong shape, NaN / inf
tensors (also in a saved policy) are refused with a ValueError naming the file and the field. (HydraModel's
hydra_config.json alpha and NaN adapters: tests/integrations/test_loader_errors.py.)"""
import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from hydra_kernels.rlhf.checkpoint import (CheckpointSchedule, capture_rng, copy_params_, latest_checkpoint,
                                           list_checkpoints, load_checkpoint, restore_rng, save_checkpoint)
from hydra_kernels.rlhf.config import PPOConfig, SFTConfig, load_config
from hydra_kernels.rlhf.data import SFTExample
from hydra_kernels.rlhf.optim import SlicedLRAdamW
from hydra_kernels.rlhf.run import Run
from hydra_kernels.rlhf.sft import hydra_sft
from tests.rlhf._tiny import CharTokenizer, tiny_model


# ------------------------------------------------------------------------- round trips, listing, pruning
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


def _params_opt():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(2, 3, 4)), torch.nn.Parameter(torch.randn(5))
    opt = SlicedLRAdamW([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.03}], lr=0.1, weight_decay=0.01,
                        slice_ratios=[(a, 1, 0.25)])
    return {"a": a, "b": b}, opt


def _step(ps, opt):
    opt.zero_grad()
    ((ps["a"] ** 3).sum() + (ps["b"].sin() * ps["a"].sum()).sum()).backward()
    opt.step()


def test_sliced_adamw_round_trip_continues_bitwise(tmp_path):
    ps, opt = _params_opt()
    _step(ps, opt)
    _step(ps, opt)
    save_checkpoint(tmp_path, 2, ps, opt, {}, {})
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    ps2, opt2 = _params_opt()
    copy_params_(ps2, ck.params, "ck")
    opt2.load_state_dict(ck.optimizer_state)
    assert [g["lr"] for g in opt2.param_groups] == [0.1, 0.03]
    for _ in range(3):
        _step(ps, opt)
        _step(ps2, opt2)
    assert all(torch.equal(ps[k], ps2[k]) for k in ps)


def test_rng_states_restore():
    import numpy as np
    meta, tensors = capture_rng()
    a = (torch.rand(3), random.random(), np.random.rand())
    restore_rng(meta, tensors)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


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


def _one_param():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    return {"p": p}, opt


# Pruning keeps "the `keep` highest steps" but never the one just written: a fresh run in an output_dir with
# an earlier, longer run's checkpoints must resume its own.
def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    params, opt = _one_param()
    for step in (10, 11):                                     # an earlier run's checkpoints
        save_checkpoint(tmp_path, step, params, opt, {}, {}, keep=2)
    path = save_checkpoint(tmp_path, 1, params, opt, {}, {}, keep=2)
    assert path.is_dir() and latest_checkpoint(tmp_path) == path


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


# ------------------------------------------------------------------------------- values read back
def _cfg(out):
    return PPOConfig(run={"output_dir": str(out), "progress": False, "checkpoint_minutes": 0})


def _params():
    p = torch.nn.Parameter(torch.ones(3, 2))
    return {"p": p}, torch.optim.AdamW([p], lr=0.1, weight_decay=0.0)


def _checkpointed(out):
    params, opt = _params()
    run = Run(_cfg(out), marker="policy.json", foreign=("sft.json",))
    run.start(params, opt)
    params["p"].grad = torch.ones(3, 2)
    opt.step()
    return run.checkpoint(1, params, opt, {})


def _resume(out):
    return Run(_cfg(out), marker="policy.json", foreign=("sft.json",)).start(*_params())


def _edit_state(ck, edit):
    state = json.loads((ck / "state.json").read_text())
    edit(state)
    (ck / "state.json").write_text(json.dumps(state))


def _edit_tensors(ck, edit):
    t = load_file(str(ck / "tensors.safetensors"))
    edit(t)
    save_file(t, str(ck / "tensors.safetensors"))


def test_unreadable_tensors_file_is_a_named_value_error(tmp_path):
    ps, opt = _params_opt()
    path = save_checkpoint(tmp_path, 1, ps, opt, {}, {})
    f = path / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="step-00000001.*not a readable checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("key, value", [("lr", 5.0), ("betas", [0.5, 0.999]), ("eps", 1.0), ("weight_decay", 0.3)])
def test_an_edited_optimizer_setting_is_refused(tmp_path, key, value):
    ck = _checkpointed(tmp_path)
    assert _resume(tmp_path)[0] == 1
    _edit_state(ck, lambda s: s["optimizer"]["param_groups"][0].update({key: value}))
    with pytest.raises(ValueError, match=rf"state.json': field optimizer.param_groups\[0\].{key} is "):
        _resume(tmp_path)


def test_optimizer_state_of_the_wrong_shape_is_refused(tmp_path):
    ck = _checkpointed(tmp_path)
    _edit_tensors(ck, lambda t: t.update({"optim/0/exp_avg": torch.zeros(2, 3)}))
    with pytest.raises(ValueError, match=r"tensors.safetensors': tensor 'optim/0/exp_avg' has shape \(2, 3\), its "
                                         r"parameter \(3, 2\)"):
        _resume(tmp_path)


@pytest.mark.parametrize("key", ["param/p", "optim/0/exp_avg_sq"])
def test_non_finite_checkpoint_tensors_are_refused(tmp_path, key):
    ck = _checkpointed(tmp_path)

    def poison(t):
        t[key] = t[key].clone()
        t[key].view(-1)[0] = float("nan")
    _edit_tensors(ck, poison)
    with pytest.raises(ValueError, match=rf"tensor '{key}' in '.*tensors.safetensors' holds NaN or inf"):
        _resume(tmp_path)


def test_an_edited_sft_learning_rate_is_refused_against_the_schedule(tmp_path):
    tok = CharTokenizer()
    demos = [SFTExample(f"{a}+1=", str(a + 1)) for a in range(8)]
    cfg = load_config(SFTConfig, None, ["epochs=2", "batch_size=4", "lr=0.01", "warmup_steps=5", "run.progress=false",
                                        "run.checkpoint_every=1", f"run.output_dir={tmp_path}"])
    hydra_sft(tiny_model(len(tok)), tok, demos, [], cfg)
    import shutil
    shutil.rmtree(tmp_path / "final")
    shutil.rmtree(latest_checkpoint(tmp_path / "checkpoints"))       # step 4: resume from step 3, mid warm-up
    other = latest_checkpoint(tmp_path / "checkpoints")
    assert other.name == "step-00000003"
    lr = json.loads((other / "state.json").read_text())["optimizer"]["param_groups"][0]["lr"]
    _edit_state(other, lambda s: s["optimizer"]["param_groups"][0].update({"lr": 0.5}))
    with pytest.raises(ValueError, match=r"step-00000003/state.json': field optimizer.param_groups\[0\].lr is 0.5, "
                                         r"the schedule gives 0.008\d* after 3 steps"):
        hydra_sft(tiny_model(len(tok)), tok, demos, [], cfg)
    _edit_state(other, lambda s: s["optimizer"]["param_groups"][0].update({"lr": 0.008, "initial_lr": 0.5}))
    with pytest.raises(ValueError, match=r"field optimizer.param_groups\[0\].initial_lr is 0.5, this run's "
                                         r"settings give 0.01"):
        hydra_sft(tiny_model(len(tok)), tok, demos, [], cfg)
    _edit_state(other, lambda s: s["optimizer"]["param_groups"][0].update({"lr": lr, "initial_lr": 0.01}))
    assert len(hydra_sft(tiny_model(len(tok)), tok, demos, [], cfg).history) == 2      # as saved: it resumes


def test_a_saved_policy_with_nan_is_refused(tmp_path):
    from hydra_kernels.rlhf.checkpoint import load_policy
    (tmp_path / "policy.json").write_text('{"variant": "hydra"}')
    save_file({"w": torch.tensor([1.0, float("inf")])}, str(tmp_path / "policy.safetensors"))

    class Models:
        variant = "hydra"
    with pytest.raises(ValueError, match=r"^path: tensor 'w' in '.*policy.safetensors' holds NaN or inf"):
        load_policy(tmp_path, Models())
