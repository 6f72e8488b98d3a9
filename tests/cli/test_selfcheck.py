"""`hydra-rlhf selfcheck` checks every public op, as its help ("check the ops against the float64 reference")
and docstring ("every op's CPU path") say. It checked ops.lora_linear only: token_logprobs, logprobs_and_kl and
linear_logprobs (the ones PPO's scoring runs on) could be wrong and selfcheck still passed.
"""
import pytest
import torch

from hydra_kernels import ops
from hydra_kernels.cli import main
from tests.cli._local import cli

OPS = ("lora_linear", "token_logprobs", "logprobs_and_kl", "linear_logprobs")


def test_selfcheck_reports_every_op():
    proc = cli("selfcheck")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in OPS:
        assert any(line.startswith(name) for line in proc.stdout.splitlines()), (name, proc.stdout)


@pytest.mark.parametrize("name", OPS)
def test_selfcheck_fails_when_an_op_is_wrong(monkeypatch, capsys, name):
    real = getattr(ops, name)

    def off(*args, **kwargs):
        out = real(*args, **kwargs)
        bump = lambda t: t + 0.01 if torch.is_tensor(t) else t      # noqa: E731
        return tuple(bump(t) for t in out) if isinstance(out, tuple) else bump(out)
    monkeypatch.setattr(ops, name, off)
    assert main(["selfcheck"]) == 1
    assert "FAIL" in capsys.readouterr().out
