"""rlhf.run.Run's files against kills and hostile settings: an earlier run's metrics kept until the new run can
replace them, a torn last metrics line, run.metrics_file confined to run.output_dir, leftovers of a kill during a
directory swap removed at the next start, a failed final/ save naming the path and the resume."""
import json
import os
import shutil

import pytest
import torch

from hydra_kernels.integrations.checkpoint import DIR_MARKER, remove_leftovers, write_dir_atomically
from hydra_kernels.rlhf.checkpoint import list_checkpoints
from hydra_kernels.rlhf.config import PPOConfig
from hydra_kernels.rlhf.run import Run


def _cfg(out, **run):
    return PPOConfig(run={"output_dir": str(out), "progress": False, "checkpoint_minutes": 0, **run})


def _run(out, **run):
    return Run(_cfg(out, **run), marker="policy.json", foreign=("sft.json",))


def _params():
    p = torch.nn.Parameter(torch.ones(3))
    return {"p": p}, torch.optim.AdamW([p], lr=0.1)


class Killed(Exception):
    pass


def _train(run, steps, kill_after=None, every=2):
    params, opt = _params()
    start, _ = run.start(params, opt)
    with run.logging(run.read_metrics(start), steps, start, "test"):
        for step in range(start, steps):
            run.log({"step": step + 1, "run": run.cfg.run.seed})
            if (step + 1) % every == 0:
                run.checkpoint(step + 1, params, opt, {})
            if kill_after == step + 1:
                raise Killed()


def _lines(path):
    """The records, without the "world_size" every record carries."""
    return [{k: v for k, v in json.loads(x).items() if k != "world_size"} for x in path.read_text().splitlines()]


def test_fresh_start_keeps_the_earlier_history_until_its_first_checkpoint(tmp_path):
    _train(_run(tmp_path, seed=1), 10)
    before = (tmp_path / "metrics.jsonl").read_text()
    # resume=false, killed after one step, before its first checkpoint (every 2): nothing of run 1 is lost.
    with pytest.raises(Killed):
        _train(_run(tmp_path, seed=2, resume=False), 10, kill_after=1)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "step-00000010"
    # At its first checkpoint the new run's records replace the old ones, the held one included.
    with pytest.raises(Killed):
        _train(_run(tmp_path, seed=2, resume=False), 10, kill_after=3)
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": s, "run": 2} for s in (1, 2, 3)]
    # And a resumed run rewrites the file at its first record (the lines after its checkpoint are repeated).
    _train(_run(tmp_path, seed=2), 4)
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": s, "run": 2} for s in (1, 2, 3, 4)]


def test_a_completed_session_without_records_writes_its_history(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 7}\n')
    run = _run(tmp_path, resume=False)
    run.start(*_params())
    with run.logging([], 0, 0, "test"):
        pass
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path):
    with pytest.raises(Killed):
        _train(_run(tmp_path), 4, kill_after=3)
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 4, "ru')           # a kill mid-write
    run = _run(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl' line 4 is incomplete"):
        assert [r["step"] for r in run.read_metrics(2)] == [1, 2]
    with pytest.warns(RuntimeWarning):
        _train(run, 4)
    assert [r["step"] for r in _lines(path)] == [1, 2, 3, 4]


@pytest.mark.parametrize("bad", ['{"step": 2', '[1, 2]', "\x00\x00"])
def test_any_other_bad_metrics_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"step": 1}}\n{bad}\n{{"step": 3}}\n')
    with pytest.raises(ValueError, match=rf"^run.metrics_file: {path}:2 is not "):
        _run(tmp_path).read_metrics(3)


@pytest.mark.parametrize("name", ["../x.jsonl", "sub/../../x.jsonl", "/tmp/hydra-metrics.jsonl", ".", "link.jsonl",
                                  "linkdir/m.jsonl"])
def test_metrics_file_must_stay_inside_output_dir(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (out / "link.jsonl").symlink_to(outside / "victim.jsonl")
    (out / "linkdir").symlink_to(outside)
    with pytest.raises(ValueError, match=r"^run.metrics_file: .* must name a file inside run.output_dir"):
        _run(out, metrics_file=name)
    assert not list(outside.iterdir())


def test_metrics_file_in_a_subdirectory_of_output_dir(tmp_path):
    _train(_run(tmp_path, metrics_file="logs/m.jsonl"), 2)
    assert [r["step"] for r in _lines(tmp_path / "logs/m.jsonl")] == [1, 2]


def test_leftovers_of_a_killed_swap_are_removed_at_the_next_start(tmp_path, monkeypatch):
    _train(_run(tmp_path), 2)
    ck = tmp_path / "checkpoints"
    # A kill in the middle of writing checkpoint 4: its temporary directory (partial marker, half the files).
    real_replace = os.replace

    def kill_on_rename(src, dst):
        if ".tmp-" in str(src):
            raise Killed()
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", kill_on_rename)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)       # a SIGKILL runs no clean-up
    with pytest.raises(Killed):
        _train(_run(tmp_path), 4)
    with pytest.raises(Killed):
        write_dir_atomically(tmp_path / "final", lambda d: (d / "policy.json").write_text("{}"), marker="policy.json")
    monkeypatch.undo()
    # And a final/ swap killed between its two renames: the earlier result is only under .final.old-*.
    write_dir_atomically(tmp_path / "final", lambda d: (d / "policy.json").write_text('"old"'), marker="policy.json")
    os.replace(tmp_path / "final", tmp_path / ".final.old-deadbeef")
    # Not ours: the user's directories of similar names, a foreign kind of result.
    (ck / ".step-00000009.tmp-mine").mkdir()
    (ck / ".step-00000009.tmp-mine/notes.txt").write_text("keep")
    write_dir_atomically(tmp_path / "other", lambda d: (d / "sft.json").write_text("{}"), marker="sft.json")
    os.replace(tmp_path / "other", tmp_path / ".final.tmp-sft")
    leftovers = sorted(p.name for p in list(ck.iterdir()) + list(tmp_path.iterdir()) if ".tmp-" in p.name
                       or ".old-" in p.name)
    assert len(leftovers) == 5, leftovers

    run = _run(tmp_path)
    run.start(*_params())
    left = sorted(p.name for p in list(ck.iterdir()) + list(tmp_path.iterdir()) if ".tmp-" in p.name
                  or ".old-" in p.name)
    assert left == [".final.tmp-sft", ".step-00000009.tmp-mine"]
    assert (tmp_path / "final/policy.json").read_text() == '"old"'       # renamed back into its place
    assert [p.name for p in list_checkpoints(ck)] == ["step-00000002"]
    assert remove_leftovers(tmp_path / "missing", "final", marker="policy.json") == []


def test_an_empty_leftover_from_a_kill_before_its_marker_is_removed(tmp_path):
    (tmp_path / "checkpoints/.step-00000003.tmp-x").mkdir(parents=True)
    assert [p.name for p in remove_leftovers(tmp_path / "checkpoints", "step-*", marker="state.json")] == \
        [".step-00000003.tmp-x"]


def test_the_partial_marker_is_never_a_result(tmp_path):
    seen = {}

    def fill(d):
        seen.update(json.loads((d / DIR_MARKER).read_text()))
        (d / "policy.json").write_text("{}")
    out = write_dir_atomically(tmp_path / "r", fill, marker="policy.json")
    assert seen["entries"] is None and seen["kind"] == "policy.json"
    assert json.loads((out / DIR_MARKER).read_text())["entries"] == ["policy.json"]


def test_a_failed_final_save_names_the_path_and_the_resume(tmp_path):
    run = _run(tmp_path)
    _train(run, 2)

    def full_disk(path):
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match=r"run.output_dir: writing '.*final' failed \(OSError: \[Errno 28\] No space "
                                      r"left on device\); the run is checkpointed after its last step "
                                      r"\('.*step-00000002'\): run it again with run.resume=true") as e:
        run.save_final(full_disk)
    assert e.value.errno == 28
    with pytest.raises(ValueError, match="^not finite$"):     # a ValueError is the caller's and passes unchanged
        run.save_final(lambda path: (_ for _ in ()).throw(ValueError("not finite")))


def test_a_safetensors_error_of_the_final_save_is_reported_the_same_way(tmp_path):
    from safetensors import SafetensorError
    run = _run(tmp_path)

    def torn(path):
        raise SafetensorError("Error while serializing: IoError(Os { code: 27, kind: FileTooLarge })")
    with pytest.raises(OSError, match=r"^run.output_dir: writing '.*final' failed \(SafetensorError: .*FileTooLarge.*"
                                      r"no checkpoint holds the last step") as e:
        run.save_final(torn)
    assert e.value.errno is None
