"""The rounded 16-bit copy of fp32 master adapters (nn.rounded_adapters): made once per layer in a no-grad
phase, never stale inside it (in-place updates, new tensors), dropped at its end, so a fused optimizer step
between phases is always seen; HydraModel.generate and the rollout's generate run inside one."""
import copy
import gc
import weakref

import pytest
import torch

from hydra_kernels.integrations import HydraModel
from hydra_kernels.nn import context, rounded_adapters, streams

from tests.integrations._models import ALPHA, R, batch, make_model, randomize_adapters


def _bf16_hydra():
    h = HydraModel.from_pretrained_base(make_model("llama", torch.bfloat16), r=R, alpha=ALPHA).eval()
    randomize_adapters(h.model)
    assert h.lora_parameters()[0].dtype == torch.float32
    return h


def test_no_grad_phase_after_a_fused_optimizer_step_sees_the_new_adapters():
    h = _bf16_hydra()
    ids, mask = batch()
    opt = torch.optim.AdamW(h.lora_parameters(), lr=1e-2, fused=True)
    versions = [p._version for p in h.lora_parameters()]
    with torch.no_grad(), rounded_adapters(h.model):
        before = h.forward_streams(ids, mask, streams=("actor",))           # rounds the adapters
    h.lm_logits(h.forward_streams(ids, mask, streams=("actor",))[0]).pow(2).mean().backward()
    opt.step()
    # The fused step bumps no version counter: a copy kept across it would be served stale.
    assert [p._version for p in h.lora_parameters()] == versions
    with torch.no_grad(), rounded_adapters(h.model):
        after = h.forward_streams(ids, mask, streams=("actor",))
    fresh = copy.deepcopy(h)
    with torch.no_grad():
        want = fresh.forward_streams(ids, mask, streams=("actor",))
    assert not torch.equal(want, before)                                     # the step did change the model
    assert torch.equal(after, want)


def test_in_place_updates_and_new_tensors_inside_the_phase_are_seen():
    h = _bf16_hydra()
    ids, mask = batch()
    layers = list(h.hydra_layers().values())

    def plain():                                                             # no scope: rounded per call
        with torch.no_grad():
            return h.forward_streams(ids, mask, streams=("base", "critic"))
    with torch.no_grad(), rounded_adapters(h.model):
        assert torch.equal(h.forward_streams(ids, mask, streams=("base", "critic")), plain())
        for layer in layers:
            layer.lora_B.mul_(1.5)                                           # in place: versions move
        scaled = h.forward_streams(ids, mask, streams=("base", "critic"))
        for layer in layers:
            layer.lora_A.data = layer.lora_A.data.flip(-1)                   # new tensors: other data pointers
        flipped = h.forward_streams(ids, mask, streams=("base", "critic"))
    assert torch.equal(flipped, plain()) and not torch.equal(flipped, scaled)


class _RecordingScope(context.RoundedScope):
    """Counts the rounded copies a scope makes; instances kept for inspection after the scope has exited."""
    made: list = []
    scopes: list = []

    def __init__(self, layers):
        super().__init__(layers)
        _RecordingScope.scopes.append(self)

    def operands(self, layer, dtype):
        held = self.copies.get((layer, dtype))
        out = super().operands(layer, dtype)
        if self.copies[(layer, dtype)] is not held:
            _RecordingScope.made.append(weakref.ref(out[0]))
        return out


@pytest.fixture
def recording(monkeypatch):
    _RecordingScope.made, _RecordingScope.scopes = [], []
    monkeypatch.setattr(context, "RoundedScope", _RecordingScope)
    return _RecordingScope


def _assert_rounded_once_and_dropped(recording, h):
    assert len(recording.scopes) == 1 and recording.scopes[0].copies == {}
    assert len(recording.made) == len(h.hydra_layers())                     # once per layer, not per token
    gc.collect()
    assert all(ref() is None for ref in recording.made)                      # nothing outlives the call


def test_hydra_model_generate_rounds_once_per_call(recording):
    h = _bf16_hydra()
    ids, mask = batch()
    out = h.generate(ids, attention_mask=mask, stream="actor", max_new_tokens=4, min_new_tokens=4, do_sample=False,
                     pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 4
    _assert_rounded_once_and_dropped(recording, h)
    recording.scopes.clear()
    with torch.no_grad():                                                    # the same tokens as without the scope
        with streams(h.model, "actor"):
            assert torch.equal(h.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                                min_new_tokens=4, do_sample=False, pad_token_id=0), out)
    assert not recording.scopes


def test_rollout_generate_rounds_once_per_rollout(recording):
    from hydra_kernels.rlhf.models import PolicyHandle
    from hydra_kernels.rlhf.rollout import generate
    h = _bf16_hydra()
    ids, mask = batch()
    ro = generate(PolicyHandle(h.model, "actor"), ids, mask, max_new_tokens=4, eos_token_id=2, pad_token_id=0,
                  temperature=0.0)
    assert ro.response_ids.shape[0] == ids.shape[0] and ro.response_ids.shape[1] >= 2
    _assert_rounded_once_and_dropped(recording, h)
