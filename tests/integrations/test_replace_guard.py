"""Writers that replace a directory as a whole (save_merged / HydraModel.merge, export_peft, and
write_dir_atomically under Hydra-SFT's and PPO's results and checkpoints) replace only a directory this library
wrote, of the same kind, holding nothing else; a missing or empty one is written; anything else is refused with
a ValueError naming the path, and nothing in it changes."""
import json
import os

import pytest
import torch

from hydra_kernels.integrations import HydraModel, checkpoint as ckpt

from tests.integrations._models import ALPHA, R, make_model, randomize_adapters

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def pretrained(tmp_path):
    """The user's own pretrained model directory (written by transformers, not by hydra_kernels)."""
    model = make_model("llama")
    model.save_pretrained(tmp_path / "my-llama")
    return tmp_path / "my-llama"


def _hydra():
    h = HydraModel.from_pretrained_base(make_model("llama"), r=R, alpha=ALPHA)
    randomize_adapters(h.model)
    return h


@pytest.mark.parametrize("write", ["merge", "save_merged", "merge_base", "export_peft"])
def test_the_users_pretrained_model_is_never_replaced(pretrained, write, tmp_path):
    h = _hydra()
    before = _tree(pretrained)
    why = "holds 'config.json'" if write == "export_peft" else "was not written by hydra_kernels"
    with pytest.raises(ValueError, match=rf"out_dir: '{pretrained}' {why}"):
        if write == "merge":
            h.merge("actor", pretrained)
        elif write == "save_merged":
            ckpt.save_merged(h.model, "critic", pretrained)
        elif write == "merge_base":
            h.merge(None, pretrained)
        else:
            h.merge(None, tmp_path / "base")
            h.export_peft("actor", pretrained)
    assert _tree(pretrained) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]       # no temporary directory left


def test_an_earlier_result_of_the_same_kind_is_replaced(tmp_path):
    h = _hydra()
    out = h.merge("actor", tmp_path / "policy")
    marker = json.loads((out / ckpt.DIR_MARKER).read_text())
    assert marker["kind"] == ckpt.MERGED_KIND and "model.safetensors" in marker["entries"]
    first = (out / "model.safetensors").read_bytes()
    h.merge("critic", out)
    assert (out / "model.safetensors").read_bytes() != first
    (tmp_path / "empty").mkdir()
    h.merge("actor", tmp_path / "empty")                                      # an empty directory is free
    assert (tmp_path / "empty" / "config.json").is_file()


def test_an_earlier_result_with_a_file_added_by_the_user_is_refused(tmp_path):
    h = _hydra()
    out = h.merge("actor", tmp_path / "policy")
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"out_dir: .*policy' holds 'notes.txt', which hydra_kernels did not write"):
        h.merge("critic", out)
    assert (out / "notes.txt").read_text() == "precious"


def test_a_result_of_another_kind_is_refused(tmp_path):
    h = _hydra()
    h.merge(None, tmp_path / "base")
    peft = h.export_peft("actor", tmp_path / "peft")
    before = _tree(peft)
    with pytest.raises(ValueError, match=r"out_dir: .*peft' holds 'adapter_config.json'"):
        h.merge("actor", peft)
    with pytest.raises(ValueError, match=r"out_dir: .*base' holds 'config.json'"):
        h.export_peft("actor", tmp_path / "base")
    ckpt.write_dir_atomically(tmp_path / "ckpt", lambda d: (d / "state.json").write_text("{}"), marker="state.json")
    with pytest.raises(ValueError, match=r"out_dir: .*ckpt' is another kind of hydra_kernels result "
                                         r"\('state.json', not 'sft.json'\)"):
        ckpt.write_dir_atomically(tmp_path / "ckpt", lambda d: None, marker="sft.json")
    assert _tree(peft) == before


def test_write_dir_atomically_marks_what_it_wrote(tmp_path):
    def fill(d):
        (d / "a.json").write_text("{}")
        (d / "sub").mkdir()
        (d / "sub" / "b.bin").write_bytes(b"x")
    out = ckpt.write_dir_atomically(tmp_path / "r", fill, marker="a.json")
    assert json.loads((out / ckpt.DIR_MARKER).read_text()) == {"format": "hydra_kernels.dir", "kind": "a.json",
                                                                "entries": ["a.json", "sub"]}
    ckpt.write_dir_atomically(out, fill, marker="a.json")                    # its own result, subdirectory and all
    # A directory holding subdirectories and a forged kind but no marker (a parent such as runs/) is refused.
    (tmp_path / "runs" / "ppo").mkdir(parents=True)
    (tmp_path / "runs" / "a.json").write_text("{}")
    with pytest.raises(ValueError, match=r"name_it: .*runs' was not written by hydra_kernels"):
        ckpt.write_dir_atomically(tmp_path / "runs", fill, marker="a.json", name="name_it")
    assert (tmp_path / "runs" / "ppo").is_dir()


def test_a_symlink_is_not_replaced(tmp_path):
    h = _hydra()
    out = h.merge("actor", tmp_path / "policy")
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(ValueError, match=r"out_dir: .*link' exists and is not a directory \(a symbolic link\)"):
        h.merge("actor", tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
