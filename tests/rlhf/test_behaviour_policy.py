"""PPO's old log-probs are the log-probs of the distribution the rollout actually sampled from.

The existing tests check greedy decoding against a full recomputation (argmax only) and the old/new log-prob
agreement at step 0; this checks the sampled path at temperature != 1 with an actor that differs from the
reference: log_softmax(generation logits / T) at each sampled token == score_rollout's logprobs (and the
reference log-probs are the reference policy's, at the same temperature).
"""
import pytest
import torch

from hydra_kernels.nn import HydraLinear
from hydra_kernels.rlhf import rollout as rollout_mod
from hydra_kernels.rlhf.config import PPOConfig
from hydra_kernels.rlhf.data import tokenize_prompts
from hydra_kernels.rlhf.models import build_ppo_models, new_reward_head
from hydra_kernels.rlhf.rollout import generate
from hydra_kernels.rlhf.scoring import score_rollout
from tests.rlhf._tiny import CharTokenizer, tiny_model

TOK = CharTokenizer()
PROMPTS = ["12+3=", "1+1=", "99+99=", "7+0="]
T = 0.7


def _perturbed(variant):
    model = tiny_model(len(TOK), seed=0)
    models = build_ppo_models(model, new_reward_head(model, torch.Generator().manual_seed(1)),
                              PPOConfig(variant=variant, lora={"r": 4, "alpha": 8}))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if variant == "full":
            for p in models.actor.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        else:
            root = models.model if models.shared else models.actor
            for m in root.modules():
                if isinstance(m, HydraLinear):
                    m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    return models


def _sample(models, which, monkeypatch):
    seen = []
    real = rollout_mod.sample_next

    def spy(logits, temperature, top_p, generator):
        tok = real(logits, temperature, top_p, generator)
        seen.append(torch.log_softmax(logits / temperature, -1).gather(-1, tok[:, None]).squeeze(-1))
        return tok

    monkeypatch.setattr(rollout_mod, "sample_next", spy)
    ids, mask = tokenize_prompts(TOK, PROMPTS, 16)
    ro = generate(models.policy(which), ids, mask, max_new_tokens=6, eos_token_id=TOK.eos_token_id,
                  pad_token_id=TOK.pad_token_id, temperature=T, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(rollout_mod, "sample_next", real)
    return ro, torch.stack(seen, 1)


@pytest.mark.parametrize("variant", ("hydra", "j-hydra", "lora", "full"))
def test_old_logprobs_are_the_sampling_distribution(variant, monkeypatch):
    models = _perturbed(variant)
    ro, behaviour = _sample(models, "actor", monkeypatch)
    m = ro.response_mask.float()
    s = score_rollout(models, ro, temperature=T, kl_estimator="k1")
    torch.testing.assert_close(s.logprobs, behaviour * m, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(s.logprobs, s.ref_logprobs, atol=1e-3)      # the actor differs from the reference
    # The reference log-probs are those of the reference policy's own sampling distribution at T.
    ro_ref, ref_behaviour = _sample(models, "reference", monkeypatch)
    s_ref = score_rollout(models, ro_ref, temperature=T, kl_estimator="k1")
    torch.testing.assert_close(s_ref.ref_logprobs, ref_behaviour * ro_ref.response_mask.float(),
                               atol=1e-5, rtol=1e-5)
    # k1 is log pi - log pi_ref, per token, 0 off the mask.
    torch.testing.assert_close(s.kl, (s.logprobs - s.ref_logprobs) * m, atol=1e-6, rtol=1e-6)
