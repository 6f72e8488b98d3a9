"""patch_model's contract and errors, the stream helpers, the heads, in-place merging and unpatching."""
import copy

import pytest
import torch
from torch import nn

import hydra_kernels as hk
from hydra_kernels.integrations import (HydraModel, disable_dropout, hydra_modules, last_token_index,
                                        merge_adapter_into_base, patch_info, position_ids_from_attention_mask,
                                        repeat_for_streams, unpatch_model)

from tests.integrations._models import ALPHA, R, batch, logits, make_model, merged_copy, randomize_adapters

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_target_modules_list_matches_suffixes_like_peft():
    model = make_model("llama")
    hk.patch_model(model, adapters=("policy",), r=R, alpha=ALPHA,
                   target_modules=["q_proj", "self_attn.v_proj", "model.layers.0.mlp.down_proj"])
    assert patch_info(model).modules == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                         "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                                         "model.layers.1.self_attn.v_proj")
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    with hk.streams(model, "policy"):
        model(torch.tensor([[5, 6, 7]]))


@pytest.mark.parametrize("targets, match", [
    (["q_projx", "v_proj"], r"target_modules: no linear layer found for 'q_projx'.*named \['down_proj'"),
    (["input_layernorm"], r"'input_layernorm' \(matches \['LlamaRMSNorm'\], not nn.Linear/Conv1D\)"),
    (["lm_head"], r"target_modules: \['lm_head'\] name output heads"),
    ("all", r"target_modules: expected 'all-linear'"),
    ([], r"target_modules: expected a non-empty list"),
])
def test_target_modules_errors(targets, match):
    model = make_model("llama")
    with pytest.raises(ValueError, match=match):
        hk.patch_model(model, target_modules=targets)
    assert not hasattr(model, "hydra_patch") and type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_unsupported_models_are_refused_with_what_is_missing():
    import transformers as T
    phi = T.AutoModelForCausalLM.from_config(T.PhiConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                         intermediate_size=64, vocab_size=97))
    with pytest.raises(ValueError, match=r"model: PhiForCausalLM has model_type 'phi', not one of the supported"):
        hk.patch_model(phi)
    hk.patch_model(phi, r=R, allow_untested=True)           # an opt-in for dense decoders outside the list
    assert len(patch_info(phi).modules) == 6
    moe = T.AutoModelForCausalLM.from_config(T.MixtralConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=97, num_local_experts=4))
    with pytest.raises(ValueError, match=r"mixture-of-experts model \(config.num_local_experts=4\)"):
        hk.patch_model(moe, allow_untested=True)

    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
    with pytest.raises(ValueError, match=r"model: no nn.Linear or Conv1D layers found in NoLinear"):
        hk.patch_model(NoLinear(), allow_untested=True)

    class Quantized(nn.Linear):
        pass
    model = make_model("llama")
    model.model.layers[0].mlp.up_proj = Quantized(32, 64)
    with pytest.raises(ValueError, match=r"cannot patch 'model.layers.0.mlp.up_proj'.*Quantized is a subclass"):
        hk.patch_model(model)
    patched = hk.patch_model(make_model("llama"))
    with pytest.raises(ValueError, match=r"model: LlamaForCausalLM is already patched"):
        hk.patch_model(patched)


def test_conv1d_weight_replaced_not_duplicated():
    model = make_model("gpt2")
    old = {n: m.weight for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    before = {id(p) for p in model.parameters()}
    hk.patch_model(model, r=R)
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    after = {id(p) for p in model.parameters()}
    # The [in, out] parameters left the model (freed once unreferenced); the new ones are [out, in] views of nothing.
    assert not ({id(w) for w in old.values()} & after)
    base_bytes = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    orig_bytes = sum(p.numel() for p in make_model("gpt2").parameters())
    assert base_bytes == orig_bytes                          # exactly one copy of every base weight
    for path, layer in hydra_modules(model).items():
        assert torch.equal(layer.weight, old[path].T) and layer.weight.is_contiguous()
    assert before - after == {id(w) for w in old.values()}


def test_unpatch_after_in_place_merge_gives_plain_sft_model():
    for arch in ("llama", "gpt2"):
        ref = make_model(arch)
        model = hk.patch_model(copy.deepcopy(ref), adapters=("sft",), r=R, alpha=ALPHA)
        randomize_adapters(model)
        ids, mask = batch()
        expected = logits(merged_copy(ref, model, "sft"), ids, mask)
        merge_adapter_into_base(model, "sft")
        assert patch_info(model).merged == ("sft",)
        with hk.streams(model, "base"):
            torch.testing.assert_close(logits(model, ids, mask), expected, rtol=1e-5, atol=1e-5)
        with hk.streams(model, "sft"):                      # the adapter was reset: its stream is the new base
            torch.testing.assert_close(logits(model, ids, mask), expected, rtol=1e-5, atol=1e-5)
        assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in hydra_modules(model).values())
        unpatch_model(model)
        assert not hasattr(model, "hydra_patch")
        assert {type(m) for m in model.modules()} == {type(m) for m in ref.modules()}
        torch.testing.assert_close(logits(model, ids, mask), expected, rtol=1e-5, atol=1e-5)
        hk.patch_model(model, adapters=("actor", "critic"), r=R)      # and PPO can patch it again


def test_repeat_and_position_helpers():
    ids, mask = batch(B=2, T=5)
    ids3, mask3 = repeat_for_streams(ids, mask, 3)
    assert torch.equal(ids3, torch.cat([ids] * 3)) and torch.equal(mask3, torch.cat([mask] * 3))
    assert repeat_for_streams(ids, None, 2)[1] is None
    with pytest.raises(ValueError, match="^n:"):
        repeat_for_streams(ids, mask, 0)
    with pytest.raises(ValueError, match="^attention_mask:"):
        repeat_for_streams(ids, mask[:, :3], 2)
    m = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_attention_mask(m).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0]]


def test_forward_streams_rejects_unknown_streams_and_shapes():
    h = HydraModel.from_pretrained_base(make_model("llama"), r=R)
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"streams: unknown stream\(s\) \['policy'\]"):
        h.forward_streams(ids, mask, streams=("base", "policy"))
    with pytest.raises(ValueError, match="^input_ids:"):
        h.forward_streams(ids[0], mask[0])
    assert h.forward_streams(ids, mask, streams="critic").shape == (1, 3, 7, 32)
    with pytest.raises(ValueError, match="^position_ids:"):
        h.forward_streams(ids, mask, position_ids=mask[:, 1:])
    with pytest.raises(ValueError, match="^model: .* is not patched"):
        HydraModel(make_model("llama"))


def test_reward_reads_last_real_token_from_the_mask_even_when_pad_is_eos():
    h = HydraModel.from_pretrained_base(make_model("llama"), r=R)
    hidden = torch.randn(2, 3, 6, 32)                        # [S, B, T, D]
    eos = 2
    ids = torch.tensor([[5, 6, 7, eos, eos, eos],            # right padding with pad == eos; the real eos counts
                        [eos, eos, 5, 6, 7, eos],            # left padding, sequence ends in eos
                        [4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [3, 5, 5]
    r = h.reward(hidden, mask)
    assert r.shape == (2, 3) and r.dtype == torch.float32
    w, b = h.reward_head.weight[0], h.reward_head.bias[0]
    for s in range(2):
        for i, t in enumerate([3, 5, 5]):
            torch.testing.assert_close(r[s, i], hidden[s, i, t] @ w + b)
    torch.testing.assert_close(h.reward(hidden[1], mask), r[1])
    with pytest.raises(ValueError, match=r"attention_mask: rows \[1\] have no real token"):
        h.reward(hidden[0], torch.tensor([[1, 0, 0, 0, 0, 0], [0] * 6, [1] * 6]))
    with pytest.raises(ValueError, match="^attention_mask:"):
        h.reward(hidden[0], mask[:2])


def test_heads_are_fp32_value_head_starts_as_reward_head_and_never_applied_implicitly():
    h = HydraModel.from_pretrained_base(make_model("qwen2", torch.bfloat16), r=R)
    assert h.reward_head.weight.dtype == torch.float32 and h.reward_head.weight.shape == (1, 32)
    assert torch.equal(h.value_head.weight, h.reward_head.weight) and torch.equal(h.value_head.bias, h.reward_head.bias)
    assert h.value_head.weight is not h.reward_head.weight
    with torch.no_grad():
        h.reward_head.weight.add_(1.0)
    assert not torch.equal(h.value_head.weight, h.reward_head.weight)
    h.init_value_head_from_reward()
    assert torch.equal(h.value_head.weight, h.reward_head.weight)
    ids, mask = batch()
    hidden = h.forward_streams(ids, mask, streams=("base", "critic"))
    assert hidden.shape == (2, 3, 7, 32) and hidden.dtype == torch.bfloat16   # hidden states, no head applied
    assert h.values(hidden[1]).shape == (3, 7) and h.values(hidden[1]).dtype == torch.float32
    # Tied LM head: lm_head_weight is the input embedding (what ops.linear_logprobs takes).
    assert h.lm_head_weight is h.model.get_input_embeddings().weight
    torch.testing.assert_close(h.lm_logits(hidden[0]), hidden[0].float() @ h.lm_head_weight.float().T)


def test_opt_hidden_size_is_the_lm_head_input():
    h = HydraModel.from_pretrained_base(make_model("opt"), r=R)
    assert h.hidden_size == 16 and h.reward_head.in_features == 16       # word_embed_proj_dim, after project_out
    assert "model.decoder.project_out" in h.patch.modules


def test_disable_dropout_and_from_pretrained_base_options():
    model = make_model("gpt2")
    assert any(m.p > 0 for m in model.modules() if isinstance(m, nn.Dropout))
    h = HydraModel.from_pretrained_base(model, adapters=("actor",), r=2, alpha=4)
    assert all(m.p == 0 for m in h.modules() if isinstance(m, nn.Dropout))
    assert h.adapters == ("actor",) and h.patch.r == 2 and h.patch.scaling == 2.0
    llama = make_model("llama")
    disable_dropout(llama)
    assert all(a.attention_dropout == 0.0 for a in (layer.self_attn for layer in llama.model.layers))
    h2 = HydraModel.from_pretrained_base(h.model)            # an already patched model is taken as is
    assert h2.model is h.model
    with pytest.raises(ValueError, match=r"r: the model is already patched with r=2, asked for 16"):
        HydraModel.from_pretrained_base(h.model, r=16)
    with pytest.raises(ValueError, match=r"base: .* is not a local model directory"):
        HydraModel.from_pretrained_base("/nonexistent/model")


def test_from_pretrained_base_loads_a_directory_with_its_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    ref = make_model("llama")
    ref.save_pretrained(tmp_path / "base")
    vocab = {f"t{i}": i for i in range(97)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2").save_pretrained(tmp_path / "base")
    h = HydraModel.from_pretrained_base(tmp_path / "base", r=R, dtype=torch.bfloat16)
    assert h.tokenizer is not None and h.tokenizer.pad_token_id == 0
    assert h.lm_head_weight.dtype == torch.bfloat16
    out = h.merge("actor", tmp_path / "merged")
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()


def test_logprobs_through_the_lm_head_match_materialised_logits():
    h = HydraModel.from_pretrained_base(make_model("gpt_neox"), r=R)
    from tests.integrations._models import randomize_adapters as rnd
    rnd(h.model)
    ids, mask = batch()
    hidden = h.forward_streams(ids, mask, streams=("actor", "base"))
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    logp, ent, kl = h.logprobs(hidden[:, :, :-1], targets, temperature=0.7, kl="k3")
    full = torch.log_softmax(h.lm_logits(hidden[:, :, :-1]) / 0.7, -1)
    want = full.gather(-1, targets.clamp_min(0)[None, ..., None].expand(2, -1, -1, 1)).squeeze(-1)
    want = want * (targets != -100)
    assert logp.shape == (2, 3, 6) and kl.shape == (3, 6)
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[0], -(full[0].exp() * full[0]).sum(-1) * (targets != -100), rtol=1e-5, atol=1e-5)


_SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, vocab_size=97)


@pytest.mark.parametrize("make, key", [
    (lambda T: T.Gemma2ForCausalLM(T.Gemma2Config(**_SMALL, head_dim=8)), "final_logit_softcapping=30.0"),
    (lambda T: T.CohereForCausalLM(T.CohereConfig(**_SMALL)), "logit_scale=0.0625"),
    (lambda T: T.GraniteForCausalLM(T.GraniteConfig(**_SMALL, logits_scaling=8.0)), "logits_scaling=8.0"),
])
def test_models_that_transform_their_logits_are_refused(make, key):
    """Their forward rescales h·Wᵀ (soft-capping, a scale): log-probs from the fused head would not be those of
    the distribution generate() samples from."""
    import transformers as T
    model = make(T)
    hk.patch_model(model, r=R, allow_untested=True)
    with pytest.raises(ValueError, match=rf"model: \w+ has config.{key}: its forward transforms the logits"):
        HydraModel(model)


@pytest.mark.parametrize("variant", ["hydra", "lora"])
def test_ppo_refuses_transformed_logits_before_patching(variant):
    import transformers as T

    from hydra_kernels.rlhf.config import PPOConfig
    from hydra_kernels.rlhf import build_ppo_models, new_reward_head
    model = T.Gemma2ForCausalLM(T.Gemma2Config(**_SMALL, head_dim=8))
    with pytest.raises(ValueError, match=r"config.final_logit_softcapping=30.0"):
        build_ppo_models(model, new_reward_head(model), PPOConfig(variant=variant))
    assert not hasattr(model, "hydra_patch")


def test_logit_transforms_switched_off_are_accepted():
    import transformers as T
    model = T.Gemma2ForCausalLM(T.Gemma2Config(**_SMALL, head_dim=8, final_logit_softcapping=None))
    hk.patch_model(model, r=R, allow_untested=True)
    hydra = HydraModel(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        h = hydra.forward_streams(ids, torch.ones_like(ids), streams=("base",))[0]
        ref = model(input_ids=ids).logits                          # LoRA B = 0: every stream is the base
    torch.testing.assert_close(hydra.lm_logits(h), ref.float(), rtol=1e-5, atol=1e-5)

