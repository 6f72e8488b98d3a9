"""DeepSpeed ZeRO-3 (integrations.fsdp's ZeRO-3 branch): the 2-process check runs under torchrun (gloo, CPU
accelerator); see _zero3_job.py. Skipped where deepspeed is not installed (it is an optional dependency)."""
from pathlib import Path

import pytest
import torch

from hydra_kernels.integrations import fsdp
from tests._util import torchrun

HERE = Path(__file__).parent


def test_two_process_zero3_equals_one_process(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional dependency)")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = torchrun(HERE / "_zero3_job.py", 2, str(tmp_path), timeout=240)
    assert out.count("ZERO3 OK") == 2, out


def test_plain_tensors_are_not_zero3():
    t = torch.arange(6.0).view(3, 2)
    assert not fsdp.is_zero3(t) and fsdp.full_shape(t) == (3, 2)
    assert fsdp.whole(t) is t and fsdp.whole(None) is None and fsdp.local_tensor(t) is t
    assert fsdp.local_part(t, t) is t
    lin = torch.nn.Linear(2, 3)
    assert fsdp.state_tensors(lin).keys() == lin.state_dict().keys() and not fsdp.any_sharded(lin)
