"""A wrong model.path / model.tokenizer_path on the command line (python -m hydra_kernels.cli).

Each error is one line naming the setting (model.path or model.tokenizer_path) and what is wrong: the
directory does not exist (never the Hub's repo-id message), it holds no model, or (ppo) it is not a Hydra-SFT
output.
"""
import pytest

from tests.cli._local import PPO_SMALL, SFT_SMALL, assert_one_line_error, cli, make_local


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_model_path")
    paths = make_local(root)
    (root / "empty").mkdir()
    return root, paths


def _sft(paths, tmp_path, *extra):
    return cli("sft", f"data.sft_path={paths['demos']}", f"run.output_dir={tmp_path / 'out'}", *SFT_SMALL, *extra)


def _ppo(paths, tmp_path, *extra):
    return cli("ppo", f"data.prompt_path={paths['prompts']}", f"run.output_dir={tmp_path / 'out'}", *PPO_SMALL,
               *extra)


def test_sft_model_path_that_does_not_exist(local, tmp_path):
    root, paths = local
    line = assert_one_line_error(_sft(paths, tmp_path, f"model.path={root / 'nope'}"), "model.path:",
                                 str(root / "nope"), "no such directory")
    assert "Repo id" not in line


def test_sft_model_path_without_a_model(local, tmp_path):
    root, paths = local
    assert_one_line_error(_sft(paths, tmp_path, f"model.path={root / 'empty'}"), "model.path:", str(root / "empty"))


def test_ppo_on_a_directory_that_is_not_a_hydra_sft_output(local, tmp_path):
    root, paths = local
    for bad in (paths["model"], root / "nope"):
        assert_one_line_error(_ppo(paths, tmp_path, f"model.path={bad}"), "model.path:", str(bad))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, model", [(_sft, "model"), (_ppo, "sft")], ids=["sft", "ppo"])
def test_tokenizer_path_is_named(local, tmp_path, command, model):
    root, paths = local
    line = assert_one_line_error(command(paths, tmp_path, f"model.path={paths[model]}",
                                         f"model.tokenizer_path={root / 'nope'}"), "model.tokenizer_path:",
                                 str(root / "nope"))
    assert "Repo id" not in line
    assert not (tmp_path / "out").exists()