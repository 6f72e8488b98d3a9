"""A patched model under torch.compile(fullgraph=True): HydraLinear traces without graph breaks (one graph per
stream layout), so a user's compiled model, and CUDA graphs through mode="reduce-overhead", keep working.
Compared with the eager patched model: stream by stream, no-grad and with gradients (CPU: the torch backend
through the op's torch.library registration, as compiled code calls it on a GPU)."""
import pytest
import torch

import hydra_kernels as hk
from hydra_kernels.integrations import hydra_modules, repeat_for_streams

from tests.integrations._models import ALPHA, R, batch, make_model, randomize_adapters

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def patched():
    torch._dynamo.reset()
    model = make_model("llama")
    hk.patch_model(model, adapters=("actor", "critic"), r=R, alpha=ALPHA)
    randomize_adapters(model)
    yield model
    torch._dynamo.reset()


def _logits(fn, ids, mask):
    return fn(input_ids=ids, attention_mask=mask).logits


def test_no_grad_every_layout_matches_eager(patched):
    ids, mask = batch(B=2, T=6)
    compiled = torch.compile(patched, fullgraph=True, dynamic=False)
    layouts = [("actor",), ("base",), ("base", "actor", "critic")]
    with torch.no_grad():
        for layout in layouts:
            rows = repeat_for_streams(ids, mask, len(layout))
            with hk.streams(patched, *layout):
                eager = _logits(patched, *rows)
                out = _logits(compiled, *rows)
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        # the layout really is part of the compiled graph: actor and base differ (adapters are non-zero)
        with hk.streams(patched, "actor"):
            actor = _logits(compiled, ids, mask)
        with hk.streams(patched, "base"):
            base = _logits(compiled, ids, mask)
        assert (actor - base).abs().max() > 1e-3


def test_gradients_match_eager(patched):
    ids, mask = batch(B=2, T=6)
    params = [p for layer in hydra_modules(patched).values() for p in (layer.lora_A, layer.lora_B)]

    def grads(fn):
        for p in params:
            p.grad = None
        with hk.streams(patched, "actor", "critic"):
            logits = _logits(fn, *repeat_for_streams(ids, mask, 2))
        (logits.float().square().mean()).backward()
        return [p.grad.clone() for p in params]

    eager = grads(patched)
    compiled = grads(torch.compile(patched, fullgraph=True, dynamic=False))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in compiled)


def test_transformers_static_cache_generate_compiles_the_patched_model(patched):
    """generate(cache_implementation="static") compiles the forward (mode reduce-overhead: CUDA graphs on a
    GPU; `_compile_all_devices` lets it compile on CPU too): same greedy tokens as eager, per stream."""
    from transformers.generation.configuration_utils import CompileConfig
    ids, mask = batch(B=2, T=6)
    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True
    kw = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    outs = {}
    with torch.no_grad():
        for stream in ("actor", "base"):
            with hk.streams(patched, stream):
                eager = patched.generate(input_ids=ids, **kw)
                outs[stream] = patched.generate(input_ids=ids, cache_implementation="static", compile_config=config,
                                                **kw)
            assert torch.equal(outs[stream], eager), stream
    assert not torch.equal(outs["actor"], outs["base"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2      # it did compile, once per stream
