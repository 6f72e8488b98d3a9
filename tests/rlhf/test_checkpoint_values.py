"""Values read back from a training checkpoint are checked against the run's own config: optimizer settings edited
in state.json, optimizer state of the wrong shape, NaN / inf tensors (also in a saved policy) are refused with a
ValueError naming the file and the field. (HydraModel's hydra_config.json alpha and NaN adapters:
tests/integrations/test_loader_errors.py.)"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hydra_kernels.rlhf.checkpoint import latest_checkpoint
from hydra_kernels.rlhf.config import PPOConfig, SFTConfig, load_config
from hydra_kernels.rlhf.data import SFTExample
from hydra_kernels.rlhf.run import Run
from hydra_kernels.rlhf.sft import hydra_sft
from tests.rlhf._tiny import CharTokenizer, tiny_model


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
