"""integrations.lean_activations: bitwise the same forward and gradients as the plain modules (also nested in
activation checkpointing, also with trained norm weights), fewer bytes held for backward, only the listed
classes touched, undone by disable, carried by deepcopy."""
import copy
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hydra_kernels.integrations import decoder_forward, patch_model
from hydra_kernels.integrations.activation_checkpointing import enable_activation_checkpointing
from hydra_kernels.integrations.lean_activations import (disable_lean_activations, enable_lean_activations,
                                                         lean_activations_enabled)

SMALL = dict(vocab_size=100, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _model(cls=LlamaForCausalLM, config=LlamaConfig, dtype=torch.float32, lora=True, act="silu"):
    torch.manual_seed(0)
    m = cls(config(**SMALL, hidden_act=act)).to(dtype).eval()
    if not lora:
        return m.requires_grad_(True)             # full fine-tuning: every weight trains, the norms' too
    patch_model(m, adapters=("actor", "critic"), r=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)                 # B starts at 0: make every adapter take part
    return m


def _grads(model, streams=("actor", "critic")):
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    h, _ = decoder_forward(model, ids, torch.ones(2, 9, dtype=torch.long), None, streams)
    (h.float() ** 2).mean().backward()
    return h.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["lora", "full", "lora+checkpointing"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-gelu"])
def test_bitwise_the_same_forward_and_gradients(dtype, how, arch):
    cls, config = (Qwen2ForCausalLM, Qwen2Config) if arch == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    plain = _model(cls, config, dtype, lora=how != "full", act="gelu" if arch.endswith("gelu") else "silu")
    lean = copy.deepcopy(plain)
    assert enable_lean_activations(lean) == 2 * 3 + 1        # per layer 2 norms + the MLP; the final norm
    if how.endswith("checkpointing"):
        enable_activation_checkpointing(plain)
        enable_activation_checkpointing(lean)
    streams = None if how == "full" else ("actor", "critic")
    (h0, g0), (h1, g1) = _grads(plain, streams), _grads(lean, streams)
    assert torch.equal(h0, h1)
    assert g0.keys() == g1.keys() and len(g0) > 0
    assert any("norm" in k for k in g0) == (how == "full")
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
    assert lean.state_dict().keys() == plain.state_dict().keys()


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under the mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self._seen = 0, 0, set()

    def _free(self, key, n):
        self.live -= n
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self._seen:
                st = t.untyped_storage()
                self._seen.add(id(st))
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, id(st), st.nbytes())
        return out


def _held(module, x):
    """Bytes the autograd graph of module(x) holds beyond the output (x itself is the caller's)."""
    with LiveBytes() as mode:
        y = module(x)
    return mode.live - y.untyped_storage().nbytes(), y


@pytest.mark.parametrize("part", ["norm", "mlp"])
def test_fewer_bytes_held_for_backward(part):
    m = _model(dtype=torch.bfloat16)
    layer = m.model.layers[0]
    plain = layer.input_layernorm if part == "norm" else layer.mlp
    lean = copy.deepcopy(plain)
    enable_lean_activations(lean)
    T, D, inter = 50, SMALL["hidden_size"], SMALL["intermediate_size"]
    x = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
    held_plain, y0 = _held(plain, x)
    held_lean, y1 = _held(lean, x)
    assert torch.equal(y0, y1)
    if part == "norm":
        # plain: the fp32 upcast of x (4 bytes a unit); lean: nothing new (it keeps x, 2 bytes a unit)
        assert held_plain >= 4 * T * D and held_lean < T, (held_plain, held_lean)
    else:
        # lean drops act_fn(gate): one bf16 [T, intermediate] fewer
        assert held_plain - held_lean >= 2 * T * inter, (held_plain, held_lean)
    with torch.no_grad():
        assert torch.equal(lean(x), plain(x))


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_mlp_backward_peak(act):
    """The peak of live bytes in the gated MLP's backward. Autograd's: 6 [T, intermediate] tensors at the
    act * up backward. With SiLU: 4 there (gate, up, the incoming gradient, d gate) and 4 at the down projection's
    backward before it (gate, up, its input, its d input), ~2 fewer; other activations recompute through
    checkpoint. fp32: the torch backend of lora_linear makes no upcast copies of its own."""
    T, D, inter = 50, SMALL["hidden_size"], SMALL["intermediate_size"]
    peaks = {}
    for name in ("plain", "lean"):
        mlp = _model(act=act).model.layers[0].mlp
        if name == "lean":
            enable_lean_activations(mlp)
        x = torch.randn(T, D, requires_grad=True)
        with LiveBytes() as mode:
            mlp(x).backward(torch.ones(T, D))
        peaks[name] = mode.peak
    unit = 4 * T * inter
    if act == "silu":
        assert peaks["plain"] - peaks["lean"] >= 1.5 * unit, (peaks, unit)
    else:
        assert peaks["lean"] <= peaks["plain"], (peaks, unit)


def test_silu_mul_refuses_a_second_backward():
    """_SiluMul's backward overwrites its saved gate: backward through the graph again must raise, not read it."""
    mlp = _model(dtype=torch.float32).model.layers[0].mlp
    enable_lean_activations(mlp)
    y = mlp(torch.randn(5, SMALL["hidden_size"], requires_grad=True))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_only_listed_classes_are_changed_and_disable_undoes_it():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2)).eval()
    assert enable_lean_activations(gpt2) == 0 and not lean_activations_enabled(gpt2)
    m = _model()
    enable_lean_activations(m)
    assert enable_lean_activations(m) == 7                  # idempotent
    copied = copy.deepcopy(m)
    norm = copied.model.layers[0].input_layernorm
    assert norm.forward.__self__ is norm                   # rebound to the copy
    disable_lean_activations(m)
    assert not lean_activations_enabled(m) and "forward" not in m.model.norm.__dict__
    assert lean_activations_enabled(copied)
