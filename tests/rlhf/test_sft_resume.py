"""Review: which checkpoint a Hydra-SFT run resumes from, and what it may resume into.

1. Pruning keeps the checkpoint just written. A run with run.resume=false in an output_dir that still holds
   checkpoints of an earlier, longer run wrote step 1, 2, ... and pruned "all but the `keep` highest steps":
   its own checkpoint was deleted at once, and a later resume continued the OLD run's checkpoint.
2. A resume with fewer epochs than the checkpoint has already done is refused: it returned (and saved as
   final) the checkpoint's weights, trained longer than asked, with a history of the shorter run.
"""
import pytest
import torch

import hydra_kernels.rlhf.run as run_module
from hydra_kernels.rlhf.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from hydra_kernels.rlhf.config import SFTConfig, load_config
from hydra_kernels.rlhf.data import PreferencePair, SFTExample
from hydra_kernels.rlhf.sft import hydra_sft
from tests.rlhf._tiny import CharTokenizer, tiny_model

TOK = CharTokenizer()
DEMOS = [SFTExample(f"{a}+{b}=", str(a + b)) for a in range(4) for b in range(2)]        # 8: 2 steps/epoch
PAIRS = [PreferencePair(f"{a}+{b}=", str(a + b), "+") for a in range(4) for b in range(2)]


def _run(out, *extra):
    cfg = load_config(SFTConfig, None, ["batch_size=4", "lr=0.01", "data.eval_fraction=0", "run.progress=false",
                                        "run.checkpoint_minutes=0", f"run.output_dir={out}", *extra])
    return hydra_sft(tiny_model(len(TOK)), TOK, DEMOS, PAIRS, cfg)


def _one_param():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    return {"p": p}, opt


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    params, opt = _one_param()
    for step in (10, 11):                                     # an earlier run's checkpoints
        save_checkpoint(tmp_path, step, params, opt, {}, {}, keep=2)
    path = save_checkpoint(tmp_path, 1, params, opt, {}, {}, keep=2)
    assert path.is_dir() and latest_checkpoint(tmp_path) == path


def test_fresh_run_in_a_used_output_dir_resumes_its_own_checkpoint(tmp_path):
    _run(tmp_path, "epochs=3", "run.checkpoint_every=1")           # leaves step-5 and step-6 (of 6)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000005", "step-00000006"]
    # A fresh run (resume=false, another seed) killed after its checkpoint of step 1 ...
    real = run_module.save_checkpoint

    def killing(root, step, *a, **k):
        path = real(root, step, *a, **k)
        raise KeyboardInterrupt("killed")
    run_module.save_checkpoint = killing
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, "epochs=3", "run.checkpoint_every=1", "run.seed=1", "run.resume=false")
    finally:
        run_module.save_checkpoint = real
    # ... is continued from that checkpoint, not from the earlier run's step 6.
    last = latest_checkpoint(tmp_path / "checkpoints")
    assert last.name == "step-00000001" and load_checkpoint(last).config["run"]["seed"] == 1


def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path):
    real = run_module.save_checkpoint

    def killing(root, step, *a, **k):
        path = real(root, step, *a, **k)
        if step == 3:
            raise KeyboardInterrupt("killed")
        return path
    run_module.save_checkpoint = killing
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, "epochs=2", "run.checkpoint_every=3")     # killed after step 3 of 4
    finally:
        run_module.save_checkpoint = real
    with pytest.raises(ValueError, match="^epochs: "):
        _run(tmp_path, "epochs=1", "run.checkpoint_every=3")
    assert not (tmp_path / "final").exists()
    res = _run(tmp_path, "epochs=2", "run.checkpoint_every=3")          # the same length resumes
    assert len(res.history) == 2
