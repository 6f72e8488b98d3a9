"""PPOModels.export_policy for every variant (a plain transformers directory that AutoModelForCausalLM loads
back into the trained policy), and a biased LM head (Phi, model.allow_untested) through SFT and PPO."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from hydra_kernels.integrations.hydra_model import new_reward_head
from hydra_kernels.rlhf.config import PPOConfig, SFTConfig, load_config
from hydra_kernels.rlhf.data import SFTExample
from hydra_kernels.rlhf.ppo import PPOTrainer
from hydra_kernels.rlhf.scoring import response_hidden
from hydra_kernels.rlhf.sft import hydra_sft
from hydra_kernels.rlhf.variants import build_ppo_models
from tests.rlhf._ppo_job import PROMPTS, run
from tests.rlhf._tiny import CharTokenizer

TOK = CharTokenizer()


def _policy_logits(models, ids):
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return {w: models.policy(w).logits(ids, mask, pos, use_cache=False)[0] for w in ("actor", "reference")}


@pytest.mark.parametrize("variant", ["hydra", "j-hydra", "lora", "full"])
def test_every_variant_exports_its_policy_as_a_plain_model(tmp_path, variant):
    _, res = run(tmp_path / "run", [f"variant={variant}", "steps=1", "run.checkpoint_every=0"])
    out = res.models.export_policy(tmp_path / "policy")
    assert out == tmp_path / "policy" and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert not any("lora" in k for k in loaded.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    want = _policy_logits(res.models, ids)
    with torch.no_grad():
        got = loaded(input_ids=ids).logits[:, -1].float()
    torch.testing.assert_close(got, want["actor"], rtol=1e-5, atol=1e-5)
    assert (want["actor"] - want["reference"]).abs().max() > 1e-4        # the policy moved: not the SFT model
    with pytest.raises(ValueError, match="out_dir"):                     # never over another kind of result
        res.models.export_policy(tmp_path / "run")


def _phi(seed=0):
    import transformers as T
    cfg = T.PhiConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                      vocab_size=len(TOK), pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id,
                      bos_token_id=TOK.bos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    torch.manual_seed(seed)
    model = T.PhiForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_(0, 1.0)           # a bias that matters
    return model


@pytest.mark.parametrize("variant", ["hydra", "lora"])
def test_ppo_on_a_biased_head_scores_the_distribution_it_samples(variant):
    model = _phi()
    assert model.lm_head.bias is not None
    cfg = load_config(PPOConfig, None, [f"variant={variant}", "batch_size=4", "mini_batch_size=2", "max_new_tokens=4",
                                        "lora.r=4", "run.progress=false"])
    with pytest.raises(ValueError, match="allow_untested"):
        build_ppo_models(model, new_reward_head(model), cfg)
    cfg = load_config(PPOConfig, None, [f"variant={variant}", "batch_size=4", "mini_batch_size=2", "max_new_tokens=4",
                                        "lora.r=4", "run.progress=false", "model.allow_untested=true",
                                        "reward_source=function"])
    models = build_ppo_models(model, new_reward_head(model), cfg)
    trainer = PPOTrainer(models, TOK, PROMPTS, cfg, reward_fn=lambda p, c, e: [0.0] * len(p),
                         reward_head_trained=False)
    _, ro = trainer.rollout(0)
    scores = models.score(ro, temperature=1.0, kl_estimator="k1")
    # The reference's log-probs from the model's own forward (h·Wᵀ + b), LoRA off.
    ref_model = models.reference if not models.shared else models.model
    with torch.no_grad():
        if models.shared:
            h = models.hydra.forward_streams(ro.input_ids, ro.attention_mask, ("base",), ro.position_ids)[0]
            logits = models.hydra.lm_logits(response_hidden(h, ro))
        else:
            logits = ref_model(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                               position_ids=ro.position_ids).logits.float()
            logits = response_hidden(logits, ro)
    lp = torch.log_softmax(logits, -1).gather(-1, ro.response_ids.unsqueeze(-1)).squeeze(-1)
    m = ro.response_mask.float()
    torch.testing.assert_close(scores.ref_logprobs, lp * m, rtol=1e-5, atol=1e-5)
    # Sampling draws from the same logits: the policy handle's include the bias.
    ids = ro.input_ids[:, :ro.prompt_len]
    with torch.no_grad():
        sampled = models.policy("reference").logits(ids, ro.attention_mask[:, :ro.prompt_len],
                                                    ro.position_ids[:, :ro.prompt_len], use_cache=False)[0]
        own = (models.model if models.shared else models.reference)
        if models.shared:
            own_logits = models.hydra.lm_logits(models.hydra.forward_streams(
                ids, ro.attention_mask[:, :ro.prompt_len], ("base",), ro.position_ids[:, :ro.prompt_len])[0])
        else:
            own_logits = own(input_ids=ids, attention_mask=ro.attention_mask[:, :ro.prompt_len],
                             position_ids=ro.position_ids[:, :ro.prompt_len]).logits.float()
    torch.testing.assert_close(sampled, own_logits[:, -1], rtol=1e-5, atol=1e-5)
    metrics = trainer.step(0)
    assert metrics["objective/kl"] == pytest.approx(0.0, abs=1e-5) and metrics["loss/policy_avg"] is not None


def test_full_sft_trains_a_biased_lm_head(tmp_path):
    model = _phi(seed=1)
    before = model.lm_head.bias.detach().clone()
    demos = [SFTExample(f"{a}+{b}=", str(a + b)) for a in range(4) for b in range(4)]
    cfg = load_config(SFTConfig, None, ["mode=full", "epochs=2", "batch_size=8", "lr=0.01", "run.progress=false",
                                        f"run.output_dir={tmp_path}", "model.allow_untested=true"])
    res = hydra_sft(model, TOK, demos, [], cfg)
    assert res.history[-1]["train/lm_loss"] < res.history[0]["train/lm_loss"]
    assert not torch.equal(res.model.lm_head.bias, before)            # the bias got a gradient and moved
