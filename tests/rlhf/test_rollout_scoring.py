"""Rollout (KV cache, EOS, padding, seeds) and scoring (streams, masks, exactness at step 0) on a tiny model."""
import pytest
import torch

from hydra_kernels.nn import HydraLinear
from hydra_kernels.rlhf.config import PPOConfig
from hydra_kernels.rlhf.data import left_pad, tokenize_prompts
from hydra_kernels.integrations import decoder_forward
from hydra_kernels.rlhf import build_ppo_models, new_reward_head
from hydra_kernels.rlhf.rollout import Rollout, generate, sample_completions, top_p_filter
from tests.rlhf._tiny import CharTokenizer, tiny_model

TOK = CharTokenizer()
PROMPTS = ["12+3=", "1+1=", "99+99=", "7+0="]
VARIANTS = ("hydra", "j-hydra", "lora", "full")


def _models(variant, seed=0):
    model = tiny_model(len(TOK), seed=seed)
    return build_ppo_models(model, new_reward_head(model, torch.Generator().manual_seed(1)),
                            PPOConfig(variant=variant, lora={"r": 4, "alpha": 8}))


def _rollout(models, seed=0, max_new_tokens=6, policy="actor"):
    ids, mask = tokenize_prompts(TOK, PROMPTS, 16)
    return generate(models.policy(policy), ids, mask, max_new_tokens=max_new_tokens, eos_token_id=TOK.eos_token_id,
                    pad_token_id=TOK.pad_token_id, generator=torch.Generator().manual_seed(seed))


def _randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, HydraLinear):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [[True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_generation_stops_at_eos_and_pads_after():
    models = _models("hydra")
    # Make EOS likely so that some rows stop early and others run to the limit.
    with torch.no_grad():
        models.model.get_output_embeddings().weight[TOK.eos_token_id] *= 0.0
        models.model.get_output_embeddings().weight[TOK.eos_token_id] += 0.05
    ro = _rollout(models, max_new_tokens=8)
    for ids, m, ended in zip(ro.response_ids.tolist(), ro.response_mask.tolist(), ro.ended.tolist()):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)
        assert ids[n:] == [TOK.pad_token_id] * (len(ids) - n)
        assert (TOK.eos_token_id in ids[:n]) == ended
        if ended:
            assert ids[n - 1] == TOK.eos_token_id and TOK.eos_token_id not in ids[:n - 1]
    again = _rollout(models, max_new_tokens=8)
    assert torch.equal(ro.response_ids, again.response_ids)


def test_kv_cache_greedy_matches_full_recomputation():
    models = _models("hydra")
    _randomize_adapters(models.model)
    ids, mask = tokenize_prompts(TOK, PROMPTS, 16)
    handle = models.policy("actor")
    ro = generate(handle, ids, mask, max_new_tokens=5, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id,
                  temperature=0.0)
    # Without a cache: re-run the whole (left-padded) sequence for every new token.
    seq, m = ids.clone(), mask.clone()
    for t in range(ro.response_ids.shape[1]):
        logits, _ = handle.logits(seq, m, None, None, False)
        nxt = logits.argmax(-1)
        live = ro.response_mask[:, t].bool()
        assert torch.equal(nxt[live], ro.response_ids[live, t])
        seq = torch.cat([seq, ro.response_ids[:, t:t + 1]], 1)
        m = torch.cat([m, ro.response_mask[:, t:t + 1]], 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_zero_ratio_is_one_and_kl_is_zero_exactly(variant):
    models = _models(variant)
    ro = _rollout(models)
    s = models.score(ro, temperature=1.0, kl_estimator="k3")
    assert torch.equal(s.kl, torch.zeros_like(s.kl))
    assert torch.equal(s.logprobs, s.ref_logprobs)
    logp, _, values = models.forward(ro, temperature=1.0, need_entropy=False)
    assert torch.equal(torch.exp(logp.detach() - s.logprobs), torch.ones_like(logp))
    assert torch.equal(values.detach(), s.values)
    # The critic starts as the reward model (value head = a copy of the reward head).
    assert torch.equal(models.value_head.weight, models.reward_head.weight)
    assert models.value_head.weight.requires_grad and not models.reward_head.weight.requires_grad
    off = ro.response_mask == 0
    for t in (s.logprobs, s.ref_logprobs, s.kl, s.entropy, s.values):
        assert torch.all(t[off] == 0)


@pytest.mark.parametrize("variant", ("hydra", "j-hydra"))
def test_multi_stream_scoring_equals_separate_passes(variant):
    models = _models(variant)
    _randomize_adapters(models.model)
    with torch.no_grad():
        models.value_head.weight.add_(0.1)
    ro = _rollout(models)
    s = models.score(ro, temperature=0.7, kl_estimator="full")
    ids, mask, pos = ro.input_ids, ro.attention_mask, ro.position_ids
    P, R = ro.prompt_len, ro.response_ids.shape[1]
    W = models.model.get_output_embeddings().weight

    def one(stream):
        h, _ = decoder_forward(models.model, ids, mask, pos, (stream,))
        return h[0]

    def logp_of(h):
        lp = torch.log_softmax(h[:, P - 1:P + R - 1] @ W.T / 0.7, -1)
        return lp, lp.gather(-1, ro.response_ids[..., None]).squeeze(-1)

    m = ro.response_mask.float()
    h_base, h_act = one("base"), one("actor")
    lp_all, lp = logp_of(h_act)
    ref_all, ref = logp_of(h_base)
    kl = (lp_all.exp() * (lp_all - ref_all)).sum(-1)
    torch.testing.assert_close(s.logprobs, lp * m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.ref_logprobs, ref * m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.kl, kl * m, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(s.logprobs, s.ref_logprobs)
    last = P + ro.lengths - 1
    torch.testing.assert_close(s.scores, models.reward_head(h_base[torch.arange(len(PROMPTS)), last]).squeeze(-1))
    h_val = one("critic") if variant == "hydra" else h_act
    torch.testing.assert_close(s.values, models.value_head(h_val[:, P - 1:P + R - 1]).squeeze(-1) * m)


def test_left_padding_does_not_change_scores():
    models = _models("hydra")
    _randomize_adapters(models.model)
    ro = _rollout(models)
    s = models.score(ro, temperature=1.0, kl_estimator="k1")
    for i in range(len(PROMPTS)):
        real = ro.prompt_ids[i][ro.prompt_mask[i].bool()].tolist()
        # The same row with 3 extra pad tokens on the left, alone in its batch.
        ids, pm = left_pad([real], TOK.pad_token_id, width=ro.prompt_len + 3)
        alone = Rollout(ids, pm, ro.response_ids[i:i + 1], ro.response_mask[i:i + 1], ro.ended[i:i + 1])
        si = models.score(alone, temperature=1.0, kl_estimator="k1")
        for a, b in ((si.logprobs, s.logprobs), (si.ref_logprobs, s.ref_logprobs), (si.values, s.values),
                     (si.scores, s.scores)):
            torch.testing.assert_close(a[0], b[i], atol=1e-5, rtol=1e-5)


def test_sample_completions_reference_is_the_sft_policy():
    models = _models("hydra")
    _randomize_adapters(models.model)
    plain = tiny_model(len(TOK))
    ref, ended = sample_completions(models, TOK, PROMPTS, policy="reference", max_new_tokens=5, temperature=0)
    assert sample_completions(plain, TOK, PROMPTS, max_new_tokens=5, temperature=0) == (ref, ended)
    act, _ = sample_completions(models, TOK, PROMPTS, policy="actor", max_new_tokens=5, temperature=0)
    assert act != ref
    with pytest.raises(ValueError, match="policy"):
        models.policy("critic")
