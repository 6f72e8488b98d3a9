"""Per architecture: streams through a whole patched model, generation, checkpoints, merge, PEFT, checkpointing.

Every test builds a tiny random model from a config (no downloads) and runs on the CPU torch backend in fp32.
"""
import copy

import pytest
import torch
from torch import nn

import hydra_kernels as hk
from hydra_kernels.integrations import HydraModel, hydra_modules, patch_info
from hydra_kernels.nn import HydraLinear

from tests.integrations._models import (ALPHA, ARCHS, PAD, R, batch, logits, make_model, merged_copy,
                                        randomize_adapters)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def hydra(arch, dtype=torch.float32, random=True):
    ref = make_model(arch, dtype)
    h = HydraModel.from_pretrained_base(copy.deepcopy(ref), adapters=("actor", "critic"), r=R, alpha=ALPHA)
    h.eval()
    if random:
        randomize_adapters(h.model)
    return ref, h


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_shares_weights_and_freezes(arch):
    model = make_model(arch)
    conv1d = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    linear = {n: m.weight for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    head = model.get_output_embeddings()
    hk.patch_model(model, r=R, alpha=ALPHA)
    info = patch_info(model)
    head_path = next(n for n, m in model.named_modules() if m is head)
    assert set(info.modules) == (set(linear) | conv1d) - {head_path}
    assert info.conv1d == frozenset(conv1d)
    assert model.get_output_embeddings() is head and type(head) is torch.nn.Linear
    for path, layer in hydra_modules(model).items():
        if path in conv1d:
            assert layer.weight.is_contiguous() and layer.weight.shape == (layer.out_features, layer.in_features)
        else:
            assert layer.weight is linear[path]            # the same Parameter: no copy
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.{w}" for p in info.modules for w in ("lora_A", "lora_B")}


@pytest.mark.parametrize("arch", ARCHS)
def test_base_stream_equals_unpatched(arch):
    ref, h = hydra(arch)                                    # random adapters must not leak into "base"
    ids, mask = batch()
    with hk.streams(h.model, "base"):
        out = logits(h.model, ids, mask)
    torch.testing.assert_close(out, logits(ref, ids, mask), rtol=1e-6, atol=1e-6)
    hidden = h.forward_streams(ids, mask, streams=("base",))
    torch.testing.assert_close(h.lm_logits(hidden[0]), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_at_init_equals_base_bitwise(arch):
    _, h = hydra(arch, random=False)
    ids, mask = batch()
    with torch.no_grad():
        base = h.forward_streams(ids, mask, streams=("base",))
        for name in ("actor", "critic"):
            assert torch.equal(h.forward_streams(ids, mask, streams=(name,)), base), name
        three = h.forward_streams(ids, mask, streams=("base", "actor", "critic"))
    assert torch.equal(three[1], three[0]) and torch.equal(three[2], three[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_stream_equals_merged_model(arch):
    ref, h = hydra(arch)
    ids, mask = batch()
    for name in ("actor", "critic"):
        with hk.streams(h.model, name):
            out = logits(h.model, ids, mask)
        expected = logits(merged_copy(ref, h.model, name), ids, mask)
        assert (expected - logits(ref, ids, mask)).abs().max() > 1e-2      # the adapter does change the model
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_three_streams_in_one_forward(arch):
    _, h = hydra(arch)
    ids, mask = batch()                                     # left padding, three different lengths
    names = ("base", "actor", "critic")
    with torch.no_grad():
        together = h.forward_streams(ids, mask, streams=names)
        for s, name in enumerate(names):
            alone = h.forward_streams(ids, mask, streams=(name,))[0]
            torch.testing.assert_close(together[s], alone, rtol=1e-5, atol=1e-5)
    assert (together[1] - together[2]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_under_stream_equals_merged_model(arch, tmp_path):
    from transformers import AutoModelForCausalLM
    ref, h = hydra(arch)
    ids, mask = batch(T=5)
    merged_dir = h.merge("actor", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert type(merged) is type(ref)
    # The written directory holds the merged weights (compared with an independent merge).
    torch.testing.assert_close(logits(merged, ids, mask), logits(merged_copy(ref, h.model, "actor"), ids, mask),
                               rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    got = h.generate(ids, mask, stream="actor", **kw)
    want = merged.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)
    base = h.generate(ids, mask, stream="base", **kw)
    assert torch.equal(base, ref.generate(input_ids=ids, attention_mask=mask, **kw))


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_exact(arch, tmp_path):
    ref, h = hydra(arch)
    with torch.no_grad():
        h.reward_head.weight.normal_()
        h.value_head.bias.fill_(0.5)
    h.save_pretrained(tmp_path / "ckpt")
    h2 = HydraModel.from_pretrained(tmp_path / "ckpt", base=copy.deepcopy(ref)).eval()
    for (n1, p1), (n2, p2) in zip(h.named_parameters(), h2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(h2.forward_streams(ids, mask), h.forward_streams(ids, mask))


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_export_loads_in_peft(arch, tmp_path):
    from peft import PeftModel
    ref, h = hydra(arch)
    h.merge(None, tmp_path / "base")                          # an in-memory base is written first (export names it)
    h.export_peft("critic", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / "peft").eval()
    ids, mask = batch()
    with hk.streams(h.model, "critic"):
        ours = logits(h.model, ids, mask)
    torch.testing.assert_close(logits(peft_model, ids, mask), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_peft_adapter_imports(arch, tmp_path):
    from peft import LoraConfig, get_peft_model
    ref, h = hydra(arch, random=False)
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(ref), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets,
                                                                init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    h.load_peft("actor", tmp_path / "peft")
    ids, mask = batch()
    with hk.streams(h.model, "actor"):
        ours = logits(h.model, ids, mask)
    torch.testing.assert_close(ours, logits(peft_model, ids, mask), rtol=1e-5, atol=1e-5)
    with hk.streams(h.model, "critic"):                    # the other adapter is untouched
        torch.testing.assert_close(logits(h.model, ids, mask), logits(ref, ids, mask), rtol=1e-6, atol=1e-6)


def _ppo_like_grads(h, ids, mask):
    h.zero_grad(set_to_none=True)
    hidden = h.forward_streams(ids, mask, streams=("actor", "critic"))
    logp = torch.log_softmax(h.lm_logits(hidden[0][:, :-1]), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    values = h.values(hidden[1])
    weights = torch.linspace(0.5, 2.0, logp.shape[1])        # per-token upstream gradients differ (PPO's case)
    loss = -(logp * weights * mask[:, 1:]).sum() + ((values - 1.0) ** 2 * mask).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in h.named_parameters() if p.grad is not None}


def _count_checkpoint_calls(monkeypatch) -> list[bool]:
    """Records use_reentrant of every torch.utils.checkpoint call made by our activation checkpointing."""
    from hydra_kernels.integrations import activation_checkpointing as ac
    calls, real = [], ac.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs["use_reentrant"])
        return real(*args, **kwargs)
    monkeypatch.setattr(ac, "checkpoint", counting)
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_gives_same_gradients(arch, monkeypatch):
    from hydra_kernels.integrations import activation_checkpointing as ac
    calls = _count_checkpoint_calls(monkeypatch)
    _, h = hydra(arch)
    h.eval()                                                # PPO's mode: transformers' own would not act here
    ids, mask = batch()
    plain = _ppo_like_grads(h, ids, mask)
    h.enable_activation_checkpointing()
    assert ac.activation_checkpointing_enabled(h.model)
    ckpt = _ppo_like_grads(h, ids, mask)
    assert calls == [False] * len(ac.checkpointable_layers(h.model))     # every layer, once, non-reentrant
    assert plain.keys() == ckpt.keys()
    assert len(plain) == 2 * len(h.patch.modules) + 2                  # every LoRA stack + the value head
    for n in plain:
        assert plain[n].abs().max() > 0 or "critic" in n, n
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("arch,reentrant", [("llama", False), ("gpt2", False), ("llama", True)])
def test_checkpointing_with_different_layouts_before_one_backward(arch, reentrant):
    """Two forwards with different stream layouts summed into one loss: each block recomputes with its own
    forward's layout (not the layout of the last forward)."""
    def grads(checkpointing):
        _, h = hydra(arch)
        h.train()
        if checkpointing:
            h.enable_activation_checkpointing(use_reentrant=reentrant)
        ids, mask = batch()
        a = h.forward_streams(ids, mask, streams=("actor", "critic"))
        b = h.forward_streams(ids[:2], mask[:2], streams=("critic",))
        (a.pow(2).mean() + b.pow(3).mean()).backward()
        return [p.grad for p in h.lora_parameters()]
    for g_ckpt, g in zip(grads(True), grads(False)):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-6)


def test_reentrant_checkpointing_gives_same_gradients(monkeypatch):
    calls = _count_checkpoint_calls(monkeypatch)
    _, h = hydra("llama")
    h.eval()
    ids, mask = batch()
    plain = _ppo_like_grads(h, ids, mask)
    h.enable_activation_checkpointing(use_reentrant=True)
    ckpt = _ppo_like_grads(h, ids, mask)
    assert calls and all(calls)
    h.disable_activation_checkpointing()                   # also drops the input require-grad hook it added
    assert getattr(h.model, "_require_grads_hook", None) is None
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_bf16(arch, tmp_path):
    ref, h = hydra(arch, dtype=torch.bfloat16, random=False)
    ids, mask = batch()
    with hk.streams(h.model, "base"):
        base = logits(h.model, ids, mask)
    torch.testing.assert_close(base, logits(ref, ids, mask), rtol=0, atol=0)
    with hk.streams(h.model, "actor"):
        assert torch.equal(logits(h.model, ids, mask), base)         # B = 0: bitwise the base
    randomize_adapters(h.model)
    assert h.lora_parameters()[0].dtype == torch.float32              # fp32 master adapters on a bf16 model
    with hk.streams(h.model, "actor"):
        actor = logits(h.model, ids, mask)
    # They enter the kernels rounded to bf16: the same forward as bf16 adapters, bit for bit.
    rounded = copy.deepcopy(h.model)
    for m in rounded.modules():
        if isinstance(m, HydraLinear):
            m.lora_A, m.lora_B = (nn.Parameter(p.detach().bfloat16()) for p in (m.lora_A, m.lora_B))
    with hk.streams(rounded, "actor"):
        assert torch.equal(logits(rounded, ids, mask), actor)
    # bf16 weights round W + ΔW differently from W and ΔW apart: compare at bf16 resolution.
    expected = logits(merged_copy(ref, h.model, "actor"), ids, mask)
    assert (actor - expected).abs().max() <= 0.05 * expected.abs().max()
    together = h.forward_streams(ids, mask, streams=("base", "actor"))
    assert together.dtype == torch.bfloat16
    torch.testing.assert_close(h.lm_logits(together[0]), base, rtol=0.02, atol=0.02)
    assert h.lm_logits(together[1]).dtype == torch.float32 and h.values(together[1]).dtype == torch.float32
    h.save_pretrained(tmp_path / "ckpt")
    h2 = HydraModel.from_pretrained(tmp_path / "ckpt", base=copy.deepcopy(ref))
    assert all(torch.equal(a, b) for a, b in zip(h.lora_parameters(), h2.lora_parameters()))
