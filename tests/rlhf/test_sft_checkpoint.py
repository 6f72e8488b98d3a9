"""Hydra-SFT (full and LoRA-merged), its masks and saved result; checkpoint files, optimizer state, RNG."""
import random

import pytest
import torch

from hydra_kernels.nn import HydraLinear
from hydra_kernels.rlhf.checkpoint import (capture_rng, latest_checkpoint, list_checkpoints, load_checkpoint,
                                           restore_rng, save_checkpoint)
from hydra_kernels.rlhf.config import SFTConfig, load_config
from hydra_kernels.rlhf.data import PreferencePair, SFTExample
from hydra_kernels.rlhf.sft import _demo_batch, _forward, _lm_logprob_sum, evaluate_pairs, hydra_sft, load_sft
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


def test_sft_resumes_from_its_epoch_checkpoint(tmp_path):
    def stop_after_first(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt("killed")
    args = ("epochs=2", "run.checkpoint_every=1")
    with pytest.raises(KeyboardInterrupt):
        hydra_sft(tiny_model(len(TOK)), TOK, DEMOS[:16], PAIRS[:16], _cfg(tmp_path / "a", "lora", *args),
                  callback=stop_after_first)
    assert (tmp_path / "a/checkpoints/step-00000001/state.json").is_file() and not (tmp_path / "a/final").exists()
    resumed = hydra_sft(tiny_model(len(TOK)), TOK, DEMOS[:16], PAIRS[:16], _cfg(tmp_path / "a", "lora", *args))
    straight = hydra_sft(tiny_model(len(TOK)), TOK, DEMOS[:16], PAIRS[:16], _cfg(tmp_path / "b", "lora", *args))
    assert resumed.history == straight.history
    sa, sb = resumed.model.state_dict(), straight.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(resumed.reward_head.weight, straight.reward_head.weight)
