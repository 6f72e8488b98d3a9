"""PPO's old log-probs are the log-probs of the distribution the rollout actually sampled from.

The existing tests check greedy decoding against a full recomputation (argmax only) and the old/new log-prob
agreement at step 0; this checks the sampled path at temperature != 1 with an actor that differs from the
reference: log_softmax(generation logits / T) at each sampled token == models.score's logprobs (and the
reference log-probs are the reference policy's, at the same temperature).

In a bf16 model too, for every variant: generation samples from fp32 logits (never rounded to bf16), and
scoring and the update use the same fp32 logits, so old and reference log-probs and KL are those of the
distribution sampled (DESIGN.md pitfall: bf16-rounded logits differ by up to 0.02 nats per token here).
"""
import pytest
import torch

from hydra_kernels.nn import HydraLinear
from hydra_kernels.rlhf import build_ppo_models, new_reward_head
from hydra_kernels.rlhf import rollout as rollout_mod
from hydra_kernels.rlhf import scoring as scoring_mod
from hydra_kernels.rlhf.config import PPOConfig
from hydra_kernels.rlhf.data import tokenize_prompts
from hydra_kernels.rlhf.rollout import generate
from tests.rlhf._tiny import CharTokenizer, tiny_model

TOK = CharTokenizer()
PROMPTS = ["12+3=", "1+1=", "99+99=", "7+0="]
T = 0.7


def _perturbed(variant, dtype=torch.float32, hidden=32, head_scale=1.0, full_noise=0.05):
    model = tiny_model(len(TOK), seed=0, hidden=hidden)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    model = model.to(dtype)
    models = build_ppo_models(model, new_reward_head(model, torch.Generator().manual_seed(1)),
                              PPOConfig(variant=variant, lora={"r": 4, "alpha": 8}))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if variant == "full":
            for p in models.actor.parameters():
                p.add_((torch.randn(p.shape, generator=g) * full_noise).to(p.dtype))
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
    s = models.score(ro, temperature=T, kl_estimator="k1")
    torch.testing.assert_close(s.logprobs, behaviour * m, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(s.logprobs, s.ref_logprobs, atol=1e-3)      # the actor differs from the reference
    # The reference log-probs are those of the reference policy's own sampling distribution at T.
    ro_ref, ref_behaviour = _sample(models, "reference", monkeypatch)
    s_ref = models.score(ro_ref, temperature=T, kl_estimator="k1")
    torch.testing.assert_close(s_ref.ref_logprobs, ref_behaviour * ro_ref.response_mask.float(),
                               atol=1e-5, rtol=1e-5)
    # k1 is log pi - log pi_ref, per token, 0 off the mask.
    torch.testing.assert_close(s.kl, (s.logprobs - s.ref_logprobs) * m, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", ("hydra", "j-hydra", "lora", "full"))
def test_bf16_old_logprobs_are_the_sampling_distribution(variant, monkeypatch):
    # Logits of a realistic size (|z| ~ 10), which bf16 rounds by ~0.03.
    models = _perturbed(variant, dtype=torch.bfloat16, hidden=64, head_scale=40.0, full_noise=0.02)
    ro, behaviour = _sample(models, "actor", monkeypatch)
    m = ro.response_mask.float()
    s = models.score(ro, temperature=T, kl_estimator="k1")
    assert (behaviour * m).abs().max() > 0.5                 # the sampled tokens are not all near-certain
    torch.testing.assert_close(s.logprobs, behaviour * m, atol=1e-4, rtol=0)
    # The update's first forward is the scoring function: ratio 1, and the actor gets a gradient through it.
    logp, ent, _ = models.forward(ro, temperature=T, need_entropy=True)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.detach(), s.logprobs, atol=1e-5, rtol=0)
    (logp.sum() + ent.sum()).backward()
    grads = [p.grad for p in models.named_trainable().values() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_fp32_logits_backward_matches_a_plain_linear():
    """full PPO trains the actor's LM head: the fp32-logit head's gradients are F.linear's (fp32 model)."""
    model = tiny_model(len(TOK), seed=0)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)
    h = torch.randn(2, 3, head.weight.shape[1], requires_grad=True)
    w = torch.randn(2, 3, head.weight.shape[0])
    (scoring_mod.logits_f32(model, h) * w).sum().backward()
    gh, gw = h.grad.clone(), head.weight.grad.clone()
    h.grad, head.weight.grad = None, None
    (torch.nn.functional.linear(h, head.weight) * w).sum().backward()
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, head.weight.grad)
