"""FSDP2 (integrations.fsdp): the 2-process checks run under torchrun (gloo, CPU); see _fsdp_job.py."""
from pathlib import Path

import pytest
import torch

from hydra_kernels.integrations import fsdp
from tests._util import torchrun
from tests.rlhf._tiny import tiny_model

HERE = Path(__file__).parent


def test_two_process_fsdp_equals_one_process():
    out = torchrun(HERE / "_fsdp_job.py", 2, timeout=240)
    assert out.count("FSDP OK") == 2, out


def test_shard_needs_a_process_group_and_a_dtype():
    with pytest.raises(ValueError, match="init_process_group"):
        fsdp.shard(tiny_model(11))
    with pytest.raises(ValueError, match="mixed_precision"):
        fsdp.shard(tiny_model(11), mixed_precision="bf16")


def test_plain_tensors_pass_through():
    t = torch.arange(6.0).view(3, 2)
    assert fsdp.full_tensor(t) is t
    assert torch.equal(fsdp.local_rows(t, 1), t[1])
    calls = []
    assert fsdp.on_rank0(lambda: calls.append(1) or "done") == "done" and calls == [1]
    assert fsdp.gathered_call(tiny_model(11), lambda x: x + 1, 1) == 2


def test_decoder_layers_of_each_architecture():
    from tests.integrations._models import ARCHS, make_model
    for arch in ARCHS:
        model = make_model(arch)
        layers = fsdp.decoder_layers(model)
        assert len(layers) == 2 and len({type(m) for m in layers}) == 1, arch


def test_two_process_saving_equals_one_process(tmp_path):
    out = torchrun(HERE / "_fsdp_save_job.py", 2, str(tmp_path), timeout=240)
    assert out.count("SAVE OK") == 2, out
