"""rlhf.variants: one small object per PPO variant, the same interface for each, the checkpoint key layout, the
roles the optimizer sees, a critic-free variant built from the same pieces, and the PPO step free of variant
branches; the rlhf homes of shared helpers (integrations) and the import of sft without ppo."""
import ast
import types
from pathlib import Path

import pytest
import torch

import hydra_kernels.rlhf as rlhf
from hydra_kernels import integrations
from hydra_kernels.integrations import hydra_model
from hydra_kernels.rlhf import variants
from hydra_kernels.rlhf.config import PPO_VARIANTS, PPOConfig
from hydra_kernels.rlhf.data import tokenize_prompts
from hydra_kernels.rlhf.models import ACTOR, SHARED_VARIANTS, PPOModels
from hydra_kernels.rlhf.rollout import generate
from tests.rlhf._tiny import CharTokenizer, tiny_model

TOK = CharTokenizer()
PROMPTS = ["12+3=", "1+1=", "99+99=", "7+0="]
RLHF = Path(rlhf.__file__).parent


def _build(variant_or_cls, seed=0):
    model = tiny_model(len(TOK), seed=seed)
    head = rlhf.new_reward_head(model, torch.Generator().manual_seed(1))
    cfg = PPOConfig(lora={"r": 4, "alpha": 8})
    if isinstance(variant_or_cls, str):
        cfg = PPOConfig(variant=variant_or_cls, lora={"r": 4, "alpha": 8})
        return rlhf.build_ppo_models(model, head, cfg)
    torch.manual_seed(0)                                 # LoRA A matrices are drawn when patching
    return variant_or_cls.build(model, head.float().requires_grad_(False), cfg)


def _rollout(models):
    ids, mask = tokenize_prompts(TOK, PROMPTS, 16)
    return generate(models.policy("actor"), ids, mask, max_new_tokens=5, eos_token_id=TOK.eos_token_id,
                    pad_token_id=TOK.pad_token_id, generator=torch.Generator().manual_seed(0))


def _move_adapters(models, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in models.named_trainable().items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_registry_matches_the_config_and_the_cli():
    assert tuple(variants.VARIANTS) == PPO_VARIANTS
    assert set(SHARED_VARIANTS) == {n for n, c in variants.VARIANTS.items() if issubclass(c, variants.SharedPPO)}
    for name, cls in variants.VARIANTS.items():
        assert issubclass(cls, PPOModels) and cls.variant == name
    model = tiny_model(len(TOK))
    with pytest.raises(ValueError, match="variant: unknown PPO variant 'nope'"):
        rlhf.build_ppo_models(model, rlhf.new_reward_head(model), types.SimpleNamespace(variant="nope"))


@pytest.mark.parametrize("variant", PPO_VARIANTS)
def test_checkpoint_keys_and_roles(variant):
    models = _build(variant)
    assert type(models) is variants.VARIANTS[variant] and models.variant == variant
    keys = list(models.named_trainable())
    prefixes = ("model.", "value_head.") if models.shared else ("actor.", "critic.", "value_head.")
    assert all(k.startswith(prefixes) for k in keys) and keys[-2:] == ["value_head.weight", "value_head.bias"]
    if models.shared:
        assert keys[:-2] == [f"model.{n}" for n, p in models.model.named_parameters() if p.requires_grad]
        assert all("lora_" in k for k in keys[:-2])
    roles = models.roles()
    by_id = {id(p): k for k, p in models.named_trainable().items()}
    actor = [(by_id[id(p)], i) for p, i in roles["actor"]]
    critic = [(by_id[id(p)], i) for p, i in roles["critic"]]
    if variant == "hydra":
        a, c = models.hydra.adapters.index("actor"), models.hydra.adapters.index("critic")
        assert actor == [(k, a) for k in keys[:-2]]
        assert critic == [("value_head.weight", None), ("value_head.bias", None)] + [(k, c) for k in keys[:-2]]
    else:
        assert actor == [(k, None) for k in keys if not k.startswith(("critic.", "value_head."))]
        assert critic == [(k, None) for k in keys if k.startswith(("critic.", "value_head."))]
    handles = models.policies()
    assert set(handles) == {"actor", "reference"} and models.policy("reference") == handles["reference"]


class NoCriticPPO(variants.SharedPPO):
    """A critic-free variant made of the same pieces: one adapter, scored with streams (base, actor)."""
    variant = "no-critic (test)"
    adapters = (ACTOR,)
    value_stream = None


def test_a_variant_without_a_critic_is_one_small_class():
    free, jh = _build(NoCriticPPO), _build(variants.JHydraPPO)
    for m in (free, jh):
        _move_adapters(m)
    assert free.value_head is None and not any(k.startswith("value_head.") for k in free.named_trainable())
    assert free.roles()["critic"] == [] and len(free.roles()["actor"]) == len(free.named_trainable())
    ro = _rollout(free)
    assert torch.equal(ro.response_ids, _rollout(jh).response_ids)     # the same policy: the same samples
    s, s_jh = free.score(ro, temperature=0.7, kl_estimator="k3"), jh.score(ro, temperature=0.7, kl_estimator="k3")
    assert s.values is None and s_jh.values is not None
    for name in ("logprobs", "ref_logprobs", "kl", "entropy", "scores"):
        assert torch.equal(getattr(s, name), getattr(s_jh, name)), name
    assert s.kl.abs().sum() > 0
    logp, ent, values = free.forward(ro, temperature=0.7, need_entropy=True)
    logp_jh, ent_jh, _ = jh.forward(ro, temperature=0.7, need_entropy=True)
    assert values is None and torch.equal(logp, logp_jh) and torch.equal(ent, ent_jh)
    logp.sum().backward()
    assert all(p.grad is not None for p in free.named_trainable().values())


def _source_strings(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


@pytest.mark.parametrize("module", ["ppo.py", "scoring.py", "optim.py", "models.py", "run.py"])
def test_no_variant_branches_outside_the_variants(module):
    """The step, scoring pieces, optimizer and scaffold never name a variant: the variant objects decide."""
    text = (RLHF / module).read_text()
    constants = _source_strings(RLHF / module)
    names = set(PPO_VARIANTS) - ({"hydra", "j-hydra"} if module == "models.py" else set())   # SHARED_VARIANTS
    assert not names & constants, names & constants
    assert "variant ==" not in text and "variant in" not in text


def _imports(path: Path) -> set[str]:
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.module:
            out.add(n.module)
        elif isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
    return out


def test_one_home_for_shared_helpers():
    assert "hydra_kernels.rlhf.ppo" not in _imports(RLHF / "sft.py")
    assert rlhf.data.position_ids_from_mask is integrations.position_ids_from_attention_mask
    assert rlhf.new_reward_head is hydra_model.new_reward_head
    for module in ("advantages.py", "scoring.py", "models.py", "data.py", "sft.py", "variants.py"):
        defined = {n.name for n in ast.walk(ast.parse((RLHF / module).read_text()))
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & {"last_token_index", "_last_hidden", "position_ids_from_mask", "new_reward_head",
                              "lm_head_weight", "hidden_size", "derived_seed", "seed_everything"}, module
    assert not hasattr(PPOModels, "frozen_state") and not hasattr(PPOModels, "extra")


def test_hydra_model_heads_use_the_one_reward_head_init():
    """HydraModel's reward head and new_reward_head come from the one initialiser (N(0, 1/(D+1)), bias 0)."""
    model = tiny_model(len(TOK))
    integrations.patch_model(model, adapters=("actor",), r=2, alpha=4)
    d = hydra_model.hidden_size(model)
    torch.manual_seed(5)
    hydra = integrations.HydraModel(model)
    torch.manual_seed(5)
    a, b = torch.nn.Linear(d, 1), torch.nn.Linear(d, 1)             # the two heads, in HydraModel's order
    hydra_model.init_reward_head_(a)
    assert torch.equal(hydra.reward_head.weight, a.weight) and torch.equal(hydra.reward_head.bias, a.bias)
    assert torch.equal(hydra.value_head.weight, a.weight) and torch.equal(a.bias, torch.zeros(1))
    head = rlhf.new_reward_head(model, torch.Generator().manual_seed(9))
    assert head.weight.dtype == torch.float32 and head.in_features == d == 32
    assert torch.equal(head.bias, torch.zeros(1))
    expected = torch.randn(1, d, generator=torch.Generator().manual_seed(9)) / (d + 1) ** 0.5
    torch.testing.assert_close(head.weight, expected, rtol=1e-6, atol=0)
