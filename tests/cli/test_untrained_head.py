"""A reward head Hydra-SFT never trained (SFT without preference pairs): sft.json records it, and PPO / GRPO with
reward_source=head refuse it unless allow_untrained_reward_head=true."""
import json

import pytest

from hydra_kernels import rlhf
from hydra_kernels.cli import main
from hydra_kernels.rlhf.sft import read_reward_head_trained
from tests.cli._local import PPO_SMALL, SFT_SMALL, make_local


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_untrained_head")
    paths = make_local(root)
    assert main(["sft", f"model.path={paths['model']}", f"data.sft_path={paths['demos']}",
                 f"run.output_dir={root / 'demos_only'}", *SFT_SMALL]) == 0
    return root, paths


def test_sft_without_pairs_records_an_untrained_head(local):
    root, paths = local
    final = root / "demos_only/final"
    assert json.loads((final / "sft.json").read_text())["reward_head_trained"] is False
    assert read_reward_head_trained(final) is False
    assert read_reward_head_trained(paths["sft"]) is True          # SFTResult's default: a head given is trained
    (root / "bad").mkdir()
    (root / "bad/sft.json").write_text('{"reward_head_trained": "no"}')
    with pytest.raises(ValueError, match="reward_head_trained must be true or false"):
        read_reward_head_trained(root / "bad")


def test_ppo_and_grpo_refuse_an_untrained_head(local, tmp_path, capsys):
    root, paths = local
    final = root / "demos_only/final"
    common = [f"model.path={final}", f"data.prompt_path={paths['prompts']}", "run.progress=false"]
    assert main(["ppo", *common, f"run.output_dir={tmp_path / 'ppo'}", *PPO_SMALL[:-1]]) == 2
    err = capsys.readouterr().err
    assert "reward_head: Hydra-SFT never trained this reward head" in err and "allow_untrained_reward_head" in err
    assert not (tmp_path / "ppo").exists()
    grpo = ["steps=1", "batch_size=2", "num_generations=2", "max_new_tokens=3", "lora.r=2"]
    assert main(["grpo", *common, f"run.output_dir={tmp_path / 'grpo'}", *grpo]) == 2
    assert "reward_head: Hydra-SFT never trained" in capsys.readouterr().err
    # Explicitly allowed: it runs.
    assert main(["ppo", *common, f"run.output_dir={tmp_path / 'ppo'}", *PPO_SMALL[:-1],
                 "allow_untrained_reward_head=true"]) == 0


def test_the_python_api_refuses_it_too(local, tmp_path):
    root, _ = local
    model, head = rlhf.load_sft(root / "demos_only/final")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(root / "demos_only/final"))
    cfg = rlhf.load_config(rlhf.PPOConfig, None, [f"run.output_dir={tmp_path}", *PPO_SMALL])
    with pytest.raises(ValueError, match="^reward_head: Hydra-SFT never trained"):
        rlhf.train_ppo(model, head, tok, ["1+1="], cfg, reward_head_trained=False)
    gcfg = rlhf.load_config(rlhf.GRPOConfig, None, [f"run.output_dir={tmp_path}", "num_generations=2",
                                                    "batch_size=2"])
    with pytest.raises(ValueError, match="^reward_head: Hydra-SFT never trained"):
        rlhf.train_grpo(model, tok, ["1+1="], gcfg, reward_head=head, reward_head_trained=False)
    assert not any(tmp_path.iterdir())
