"""HydraLinear: contract, stream layouts against the reference, fp32 master adapters of a 16-bit layer."""
import pytest
import torch
from torch import nn

import hydra_kernels as hk
from hydra_kernels import reference
from hydra_kernels.nn import context, rounded_adapters


def make_layer(K=13, N=11, r=4, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N)
    layer = hk.HydraLinear.from_linear(lin, adapters=("actor", "critic"), r=r, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    return lin, layer


def test_from_linear_shares_weight_and_freezes():
    lin, layer = make_layer()
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (2, 4, 13) and layer.lora_B.shape == (2, 11, 4)
    assert layer.scaling == 2.0 and layer.adapters == ("actor", "critic")
    fresh = hk.HydraLinear.from_linear(nn.Linear(13, 11), r=4)
    assert torch.count_nonzero(fresh.lora_B) == 0 and torch.count_nonzero(fresh.lora_A) > 0


def test_adapters_of_a_16bit_layer_are_fp32_master_weights():
    lin = nn.Linear(13, 11).bfloat16()
    layer = hk.HydraLinear.from_linear(lin, r=4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert hk.HydraLinear.from_linear(nn.Linear(13, 11), r=4).lora_A.dtype == torch.float32
    assert hk.HydraLinear.from_linear(nn.Linear(13, 11).double(), r=4).lora_A.dtype == torch.float64
    same = hk.HydraLinear.from_linear(nn.Linear(13, 11).bfloat16(), r=4, adapter_dtype=torch.bfloat16)
    assert same.lora_A.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="adapter_dtype"):
        hk.HydraLinear.from_linear(nn.Linear(13, 11).bfloat16(), r=4, adapter_dtype=torch.float16)

    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 13).bfloat16()
    with hk.streams(layer, "actor", "critic"):
        y_grad = layer(x.repeat(2, 1, 1))                    # grad mode: the op rounds the masters itself
        with torch.no_grad():
            y_call = layer(x.repeat(2, 1, 1))                 # no grad, no scope: rounded on the call
            with rounded_adapters(layer):
                y = layer(x.repeat(2, 1, 1))                  # no grad in a scope: a rounded copy, reused
                cached = context.rounded_operands(layer, torch.bfloat16)[0]
                assert cached.dtype == torch.bfloat16
                assert torch.equal(layer(x.repeat(2, 1, 1)), y)
                assert context.rounded_operands(layer, torch.bfloat16)[0] is cached
    assert torch.equal(y, y_grad) and torch.equal(y_call, y_grad)
    # An optimizer step changes the masters in place: the next no-grad phase must see it.
    y_grad.float().pow(2).sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
    torch.optim.SGD(layer.parameters(), lr=1.0).step()
    with torch.no_grad(), rounded_adapters(layer), hk.streams(layer, "actor", "critic"):
        after = layer(x.repeat(2, 1, 1))
        assert context.rounded_operands(layer, torch.bfloat16)[0] is not cached and not torch.equal(after, y)
    with hk.streams(layer, "actor", "critic"):
        assert torch.equal(layer(x.repeat(2, 1, 1)), after)


def test_rejects_dropout_and_bad_names():
    with pytest.raises(ValueError, match="^lora_dropout:"):
        hk.HydraLinear.from_linear(nn.Linear(4, 4), lora_dropout=0.1)
    with pytest.raises(ValueError, match="^adapters:"):
        hk.HydraLinear.from_linear(nn.Linear(4, 4), adapters=("base",))
    with pytest.raises(ValueError, match="^r:"):
        hk.HydraLinear.from_linear(nn.Linear(4, 4), r=0)
    _, layer = make_layer()
    with pytest.raises(ValueError, match="^streams:"):
        with hk.streams(layer, "actor", "policy"):
            pass
    with pytest.raises(ValueError, match="^module:"):
        with hk.streams(nn.Linear(3, 3), "actor"):
            pass


@pytest.mark.parametrize("names", [("actor",), ("base", "actor"), ("critic", "base", "actor")])
def test_streams_layout_matches_reference(names):
    _, layer = make_layer()
    x = torch.randn(5, 13)
    xs = x.repeat(len(names), 1)
    with hk.streams(layer, *names):
        y = layer(xs)
    idx = [{"base": -1, "actor": 0, "critic": 1}[n] for n in names]
    ref = reference.lora_linear(xs.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
                                layer.lora_B.double(), [layer.scaling] * 2, idx)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_default_stream_outside_context_and_restore():
    _, layer = make_layer()
    x = torch.randn(3, 13)
    y_actor = layer(x)                                   # default: first adapter
    hk.set_default_stream(layer, "base")
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    with hk.streams(layer, "actor"):
        torch.testing.assert_close(layer(x), y_actor)
        with hk.streams(layer, "critic", "base"):
            pass
        torch.testing.assert_close(layer(x), y_actor)     # nested contexts restore
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
