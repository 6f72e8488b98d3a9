"""rlhf.run.Run, the scaffold hydra_sft and train_ppo share: final/ checked up front, fresh start and resume
(config, inputs and the caller's length check; params, optimizer, RNG and trainer state), the metrics file
rewritten to the resumed history, the progress bar, the final save."""
import json

import pytest
import torch

from hydra_kernels.rlhf.checkpoint import list_checkpoints
from hydra_kernels.rlhf.config import PPOConfig, SFTConfig
from hydra_kernels.rlhf.run import Run, derived_seed, seed_everything


def _cfg(out, **run):
    return PPOConfig(run={"output_dir": str(out), "progress": False, "checkpoint_minutes": 0, **run})


def _params():
    p = torch.nn.Parameter(torch.ones(3))
    return {"p": p}, torch.optim.AdamW([p], lr=0.1)


def _train(run, params, opt, start, steps, state=None):
    with run.logging(run.read_metrics(start), steps, start, "test"):
        for step in range(start, steps):
            params["p"].grad = torch.randn(3)                  # the global RNG: restored on resume
            opt.step()
            run.log({"step": step + 1, "p": params["p"].sum().item()})
            if run.due(step + 1):
                run.checkpoint(step + 1, params, opt, {"done": step + 1})
            run.tick(loss=0.5, skipped=None)


def test_fresh_run_then_resume_continues_bitwise(tmp_path):
    seed_everything(0)
    params, opt = _params()
    straight = Run(_cfg(tmp_path / "a", checkpoint_every=2), marker="policy.json", foreign=("sft.json",))
    assert straight.start(params, opt) == (0, None)
    _train(straight, params, opt, 0, 4)
    want = params["p"].detach().clone()

    seed_everything(0)
    params, opt = _params()
    run = Run(_cfg(tmp_path / "b", checkpoint_every=2), marker="policy.json", foreign=("sft.json",))
    run.inputs = {"data.prompt_path": "abc"}
    run.start(params, opt)
    _train(run, params, opt, 0, 3)                       # checkpoint after step 2; step 3 is lost
    assert [p.name for p in list_checkpoints(run.checkpoints)] == ["step-00000002"]

    torch.manual_seed(123)                               # what the checkpoint's RNG state must undo
    params, opt = _params()
    again = Run(_cfg(tmp_path / "b", checkpoint_every=2), marker="policy.json", foreign=("sft.json",))
    again.inputs = {"data.prompt_path": "abc"}
    seen = []
    start, state = again.start(params, opt, check=lambda ck: seen.append(ck.step))
    assert (start, seen) == (2, [2])
    assert state == {"done": 2, "inputs": {"data.prompt_path": "abc"}}
    assert opt.state_dict()["state"][0]["step"] == 2
    assert [r["step"] for r in again.read_metrics(start)] == [1, 2]
    _train(again, params, opt, start, 4)
    assert torch.equal(params["p"], want)
    lines = [json.loads(x) for x in again.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and [r["step"] for r in again.history] == [1, 2, 3, 4]
    assert lines == [json.loads(x) for x in straight.metrics_path.read_text().splitlines()]
    assert again.save_final(lambda path, x: (path, x), 7) == (again.final, 7)


def test_resume_refusals(tmp_path):
    params, opt = _params()
    run = Run(_cfg(tmp_path, checkpoint_every=1), marker="policy.json", foreign=("sft.json",))
    run.inputs = {"model.path": "m1"}
    run.start(params, opt)
    _train(run, params, opt, 0, 1)
    other = Run(_cfg(tmp_path), marker="policy.json", foreign=("sft.json",))
    other.inputs = {"model.path": "m2"}
    with pytest.raises(ValueError, match=r"run.output_dir: .* started from other inputs \(model.path: "):
        other.start(*_params())
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.0001 there, 0.5 here\)"):
        Run(PPOConfig(lr=0.5, run={"output_dir": str(tmp_path)}), marker="policy.json",
            foreign=("sft.json",)).start(*_params())

    def too_long(ck):
        raise ValueError(f"steps: after {ck.step}")
    run = Run(_cfg(tmp_path), marker="policy.json", foreign=("sft.json",))
    run.inputs = {"model.path": "m1"}
    with pytest.raises(ValueError, match="^steps: after 1$"):
        run.start(*_params(), check=too_long)
    # resume=false: a fresh start beside the old checkpoint.
    assert Run(_cfg(tmp_path, resume=False), marker="policy.json", foreign=("sft.json",)).start(*_params()) == (0, None)


def test_final_of_another_kind_is_refused_before_any_work(tmp_path):
    from hydra_kernels.integrations.checkpoint import write_dir_atomically
    write_dir_atomically(tmp_path / "final", lambda d: (d / "sft.json").write_text("{}"), marker="sft.json")
    with pytest.raises(ValueError, match="run.output_dir"):
        Run(_cfg(tmp_path), marker="policy.json", foreign=("sft.json",))
    Run(SFTConfig(run={"output_dir": str(tmp_path)}), marker="sft.json", foreign=("policy.json",))


def test_progress_bar_shows_floats_and_missing_values(tmp_path, monkeypatch):
    import tqdm.auto
    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            bars.append(self)
            super().__init__(*a, **k)
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    run = Run(_cfg(tmp_path, progress=True), marker="policy.json", foreign=("sft.json",))
    params, opt = _params()
    run.start(params, opt)
    _train(run, params, opt, 0, 2)
    assert len(bars) == 1 and bars[0].n == 2 and bars[0].total == 2
    assert bars[0].postfix == "loss=0.500, skipped=None"


def test_derived_seeds_are_distinct_per_step_and_purpose():
    seeds = {derived_seed(s, step, salt) for s in range(3) for step in range(50) for salt in range(16)}
    assert len(seeds) == 3 * 50 * 16 and all(0 <= x < 2 ** 63 for x in seeds)
