"""Review: the rounded copy of fp32 master adapters that HydraLinear reuses under no_grad must not outlive an
optimizer step. Fused optimizers (torch's fused=True, the default `adamw_torch_fused` of transformers' Trainer)
update parameters in place without bumping their version counters, so a cache keyed on versions alone served
the pre-step adapters to every later no-grad forward (evaluation, generation)."""
import copy

import torch

from hydra_kernels.integrations import HydraModel

from tests.integrations._models import ALPHA, R, batch, make_model, randomize_adapters


def test_no_grad_forward_after_a_fused_optimizer_step_sees_the_new_adapters():
    h = HydraModel.from_pretrained_base(make_model("llama", torch.bfloat16), r=R, alpha=ALPHA).eval()
    randomize_adapters(h.model)
    assert h.lora_parameters()[0].dtype == torch.float32
    ids, mask = batch()
    opt = torch.optim.AdamW(h.lora_parameters(), lr=1e-2, fused=True)
    versions = [p._version for p in h.lora_parameters()]
    with torch.no_grad():
        before = h.forward_streams(ids, mask, streams=("actor",))           # fills the rounded-adapter cache
    h.lm_logits(h.forward_streams(ids, mask, streams=("actor",))[0]).pow(2).mean().backward()
    opt.step()
    assert [p._version for p in h.lora_parameters()] == versions           # what made the old key miss it
    with torch.no_grad():
        after = h.forward_streams(ids, mask, streams=("actor",))
    fresh = copy.deepcopy(h)                                                  # no cache history
    with torch.no_grad():
        want = fresh.forward_streams(ids, mask, streams=("actor",))
    assert not torch.equal(want, before)                                     # the step did change the model
    assert torch.equal(after, want)
