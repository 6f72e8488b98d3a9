"""`hydra-rlhf ppo --export-peft DIR`: the PPO actor adapter as a PEFT LoRA directory that names the SFT model it
was trained on (absolute path), so peft's AutoPeftModelForCausalLM loads it as the merged policy (--merge-to)."""
import json

import pytest
import torch

from tests.cli._local import PPO_SMALL, assert_one_line_error, cli, make_local

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_export_peft")
    return root, make_local(root)


def _ppo(paths, out, *extra, cwd=None):
    kw = {} if cwd is None else {"cwd": cwd}
    return cli("ppo", f"model.path={paths['sft']}", f"data.prompt_path={paths['prompts']}", f"run.output_dir={out}",
               *PPO_SMALL, *extra, **kw)


def test_export_peft_loads_in_peft_as_the_merged_policy(local, tmp_path):
    root, paths = local
    # model.path relative to the working directory, as users type it.
    proc = cli("ppo", "model.path=sft", f"data.prompt_path={paths['prompts']}", f"run.output_dir={tmp_path / 'ppo'}",
               *PPO_SMALL, "--merge-to", tmp_path / "policy", "--export-peft", tmp_path / "peft", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["peft_adapter"] == str(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(paths["sft"].resolve())

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft"), dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy"), dtype=torch.float32).eval()
    sft = AutoModelForCausalLM.from_pretrained(str(paths["sft"]), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 12, 7, 3, 11]])
    with torch.no_grad():
        got, want, before = (m(input_ids=ids).logits for m in (peft_model, policy, sft))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, want, rtol=1e-5, atol=1e-5)        # PPO moved the policy: a real check


def test_export_peft_is_refused_before_training(local, tmp_path):
    _, paths = local
    proc = _ppo(paths, tmp_path / "ppo", "variant=lora", "--export-peft", tmp_path / "peft")
    assert_one_line_error(proc, "--export-peft", "variant 'lora'")
    mine = tmp_path / "my-adapter"                                 # a PEFT adapter the user trained elsewhere
    mine.mkdir()
    (mine / "adapter_config.json").write_text("{}")
    proc = _ppo(paths, tmp_path / "ppo", "--export-peft", mine)
    assert_one_line_error(proc, "--export-peft", str(mine), "was not written by hydra_kernels")
    assert (mine / "adapter_config.json").read_text() == "{}" and not (tmp_path / "ppo").exists()
