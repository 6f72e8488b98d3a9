"""model.activation_checkpointing: the trained forwards of PPO (every variant) and Hydra-SFT (full and LoRA)
recompute decoder-layer activations in backward, in eval() mode too; gradients and losses are unchanged,
rollouts and no-grad scoring are untouched, and far fewer bytes are saved for backward."""
import copy

import pytest
import torch

from hydra_kernels.integrations import activation_checkpointing as ac
from hydra_kernels.nn import HydraLinear
from hydra_kernels.rlhf import sft as sft_module
from hydra_kernels.rlhf import build_ppo_models, new_reward_head
from hydra_kernels.rlhf.config import ModelConfig, PPOConfig, SFTConfig, load_config
from hydra_kernels.rlhf.data import PreferencePair, SFTExample, tokenize_prompts
from hydra_kernels.rlhf.models import ACTOR, BASE, CRITIC
from hydra_kernels.rlhf.ppo import PPOTrainer
from hydra_kernels.rlhf.sft import hydra_sft
from tests.rlhf._ppo_job import PROMPTS
from tests.rlhf._tiny import CharTokenizer, frozen_state, tiny_model

TOK = CharTokenizer()
VARIANTS = ("hydra", "j-hydra", "lora", "full")
PPO_OVERRIDES = ["steps=1", "batch_size=4", "mini_batch_size=4", "ppo_epochs=1", "max_new_tokens=5", "lr=0.01",
                 "temperature=0.7", "entropy_coef=0.01", "lora.r=4", "lora.alpha=8", "run.progress=false"]


class SavedBytes:
    """Bytes saved for backward while active: unique storages packed by autograd, parameters left out (they
    are resident anyway). Storages are kept alive, so a freed address cannot be reused and miscounted.
    Tensors saved inside a checkpointed region are packed by checkpoint's own (inner) hooks, not here."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.storages = {}

    def _pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.params:
            self.storages[s.data_ptr()] = s
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.storages.values())


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Counts torch.utils.checkpoint calls made by the decoder-layer wrapper."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)
    monkeypatch.setattr(ac, "checkpoint", counting)
    return calls


def _trained_modules(models):
    return [models.model] if models.shared else [models.actor, models.critic]


def _randomize_adapters(models, seed=0):
    """Nonzero B, so that the A matrices receive gradients too (at B = 0 only B does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _trained_modules(models):
            for layer in m.modules():
                if isinstance(layer, HydraLinear):
                    layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def _all_params(models):
    return list(models.named_trainable().values()) + list(frozen_state(models).values())


def _one_ppo_step(variant, on, calls, monkeypatch):
    """One real PPOTrainer step (rollout, scoring, one minibatch update): rollout, scores, the gradients the
    optimizer sees, bytes saved for backward, and checkpoint calls during rollout+scoring and during the update."""
    torch.manual_seed(0)                                          # LoRA A matrices are drawn when patching
    model = tiny_model(len(TOK))
    cfg = load_config(PPOConfig, None, [*PPO_OVERRIDES, f"variant={variant}",
                                        f"model.activation_checkpointing={str(on).lower()}"])
    models = build_ppo_models(model, new_reward_head(model, torch.Generator().manual_seed(1)), cfg)
    assert [ac.activation_checkpointing_enabled(m) for m in _trained_modules(models)] == [on] * (1 + (not models.shared))
    if not models.shared:                                          # frozen copies never run with grad
        assert not ac.activation_checkpointing_enabled(models.reference)
        assert not ac.activation_checkpointing_enabled(models.reward_model)
    _randomize_adapters(models)
    trainer = PPOTrainer(models, TOK, PROMPTS, cfg)
    seen = {}

    def score(*args, **kwargs):
        out = real_score(*args, **kwargs)
        seen["scores"], seen["calls_before_update"] = out, len(calls)
        return out
    real_score = models.score
    monkeypatch.setattr(models, "score", score)
    rollout = trainer.rollout

    def keep_rollout(step):
        out = rollout(step)
        seen["rollout"] = out[1]
        return out
    trainer.rollout = keep_rollout
    step = trainer.optimizer.step

    def grab_grads(*args, **kwargs):
        seen["grads"] = {n: p.grad.clone() for n, p in trainer.params.items() if p.grad is not None}
        seen["update_calls"] = len(calls) - seen["calls_before_update"]
        return step(*args, **kwargs)
    trainer.optimizer.step = grab_grads
    with SavedBytes(_all_params(models)) as saved:
        trainer.step(0)
    return seen, saved.nbytes


@pytest.mark.parametrize("variant", VARIANTS)
def test_ppo_update_gradients_unchanged_and_saved_bytes_shrink(variant, checkpoint_calls, monkeypatch):
    off, off_bytes = _one_ppo_step(variant, False, checkpoint_calls, monkeypatch)
    assert not checkpoint_calls
    on, on_bytes = _one_ppo_step(variant, True, checkpoint_calls, monkeypatch)
    # Rollout and no-grad scoring: never checkpointed, bitwise the same.
    assert on["calls_before_update"] == 0
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "ended"):
        assert torch.equal(getattr(on["rollout"], name), getattr(off["rollout"], name)), name
    for name in ("logprobs", "ref_logprobs", "kl", "entropy", "values", "scores"):
        assert torch.equal(getattr(on["scores"], name), getattr(off["scores"], name)), name
    # The update: every decoder layer of every trained forward is checkpointed, under grad.
    layers, forwards = 2, (1 if variant == "j-hydra" else 2)       # hydra: one forward per role (two streams)
    assert checkpoint_calls == [True] * (layers * forwards) and on["update_calls"] == layers * forwards
    assert off["grads"].keys() == on["grads"].keys() and off["grads"]
    assert any("lora_A" in n or variant == "full" for n in off["grads"])
    for n, g in off["grads"].items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(on["grads"][n], g, rtol=1e-6, atol=0, msg=n)
    # The test that fails when checkpointing silently does nothing (e.g. transformers' own, in eval mode).
    assert on_bytes * 4 < off_bytes, (on_bytes, off_bytes)


def test_transformers_own_checkpointing_does_nothing_in_eval_mode():
    """Why the wrapper exists: transformers checkpoints only when module.training is True, and the PPO models
    run in eval() mode. (If this starts failing, transformers changed; the wrapper stays correct.)"""
    def saved(model):
        ids, mask = tokenize_prompts(TOK, PROMPTS[:4], 8)
        with SavedBytes(model.parameters()) as s:
            model(input_ids=ids, attention_mask=mask, use_cache=False).logits.sum().backward()
        return s.nbytes
    plain = saved(tiny_model(len(TOK)))
    hf = tiny_model(len(TOK))
    hf.gradient_checkpointing_enable()           # the name transformers 5.17 (the GPU image) has too
    assert saved(hf.eval()) == plain
    ours = tiny_model(len(TOK))
    assert ac.enable_activation_checkpointing(ours) == 2
    assert saved(ours.eval()) * 2 < plain


def test_multi_stream_forward_recomputes_with_its_own_layouts(checkpoint_calls):
    """A (base, actor, critic) forward, then a critic-only forward and a no-grad forward with other layouts,
    then one backward: each checkpointed layer recomputes with the layout of the forward that built it."""
    def grads(on):
        torch.manual_seed(0)
        model = tiny_model(len(TOK))
        models = build_ppo_models(model, new_reward_head(model), PPOConfig(
            lora={"r": 4, "alpha": 8}, model={"activation_checkpointing": on}))
        _randomize_adapters(models)
        hydra = models.hydra
        ids, mask = tokenize_prompts(TOK, PROMPTS[:4], 8)
        h3 = hydra.forward_streams(ids, mask, (BASE, ACTOR, CRITIC))
        h1 = hydra.forward_streams(ids[:2], mask[:2], (CRITIC,))
        with torch.no_grad():
            hydra.forward_streams(ids, mask, (ACTOR, BASE))
        loss = sum((s + 1) * h3[s].pow(2).mean() for s in range(3)) + h1.pow(3).mean()
        loss.backward()
        return [p.grad for p in hydra.lora_parameters()]
    plain = grads(False)
    assert not checkpoint_calls
    ckpt = grads(True)
    assert checkpoint_calls == [True] * 4                 # 2 layers x 2 grad-mode forwards
    for g_ckpt, g in zip(ckpt, plain):
        assert g.abs().amax(dim=(1, 2)).min() > 0         # both adapters get gradients
        torch.testing.assert_close(g_ckpt, g, rtol=1e-6, atol=0)


DEMOS = [SFTExample(f"{a}+{b}=", str(a + b)) for a in range(4) for b in range(4)]
PAIRS = [PreferencePair(f"{a}+{b}=", str(a + b), "+=") for a in range(4) for b in range(4)]


@pytest.mark.parametrize("mode", ("full", "lora"))
def test_sft_loss_trajectory_unchanged(tmp_path, mode, checkpoint_calls, monkeypatch):
    logged = []
    lm_logprob_sum = sft_module._lm_logprob_sum

    def log_lm(model, h, batch):                          # every LM log-prob sum: per training step and eval
        out = lm_logprob_sum(model, h, batch)
        logged.append(float(out[0].detach()))
        return out
    monkeypatch.setattr(sft_module, "_lm_logprob_sum", log_lm)

    def run(on):
        logged.clear()
        model = tiny_model(len(TOK))
        cfg = load_config(SFTConfig, None, [f"mode={mode}", "epochs=2", "batch_size=8", "lr=0.01", "lora.r=4",
                                            "lora.alpha=8", "run.progress=false", f"run.output_dir={tmp_path / str(on)}",
                                            f"model.activation_checkpointing={str(on).lower()}"])
        res = hydra_sft(model, TOK, DEMOS, PAIRS, cfg, eval_pairs=PAIRS[:4])
        assert not ac.activation_checkpointing_enabled(model)        # the returned model runs plain
        return list(logged), res
    off_log, off = run(False)
    assert not checkpoint_calls
    on_log, on = run(True)
    # 2 epochs x 2 steps x (demo forward + pair forward) x 2 layers, all under grad; no-grad evaluation is plain.
    assert checkpoint_calls == [True] * 16
    assert len(off_log) >= 8 and on_log == off_log
    assert on.history == off.history
    for (k, a), (_, b) in zip(on.model.state_dict().items(), off.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=k)
    torch.testing.assert_close(on.reward_head.weight, off.reward_head.weight, rtol=1e-6, atol=0)


def test_config_flag_is_validated_and_defaults_off():
    assert PPOConfig().model.activation_checkpointing is False and SFTConfig().model.activation_checkpointing is False
    assert load_config(PPOConfig, None, ["model.activation_checkpointing=true"]).model.activation_checkpointing
    with pytest.raises(ValueError, match=r"^model\.activation_checkpointing: must be a bool"):
        load_config(SFTConfig, None, ["model.activation_checkpointing=maybe"])
    with pytest.raises(ValueError, match=r"^model\.activation_checkpointing: must be a bool, got 1"):
        PPOConfig(model=ModelConfig(activation_checkpointing=1))


def test_enable_disable_keeps_state_dict_and_survives_deepcopy(checkpoint_calls):
    model = tiny_model(len(TOK))
    keys = list(model.state_dict())
    assert ac.enable_activation_checkpointing(model) == ac.enable_activation_checkpointing(model) == 2
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)                           # the wrapper is rebound to the copy's layers
    ids, mask = tokenize_prompts(TOK, PROMPTS[:2], 8)
    twin(input_ids=ids, attention_mask=mask, use_cache=False).logits.sum().backward()
    assert checkpoint_calls == [True, True]
    with pytest.warns(UserWarning, match="KV cache under grad"):     # a cache: run plain (and say so)
        twin(input_ids=ids, attention_mask=mask, use_cache=True)
    assert checkpoint_calls == [True, True]
    assert all(p.grad is not None for p in twin.parameters()) and all(p.grad is None for p in model.parameters())
    with torch.no_grad():                                 # generation-style: no grad, with a KV cache
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert checkpoint_calls == [True, True]
    ac.disable_activation_checkpointing(model)
    assert not ac.activation_checkpointing_enabled(model) and ac.activation_checkpointing_enabled(twin)
    with pytest.raises(ValueError, match="model.activation_checkpointing"):
        ac.enable_activation_checkpointing(torch.nn.Linear(2, 2))
