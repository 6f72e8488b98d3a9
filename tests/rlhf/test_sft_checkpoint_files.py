"""Review: checkpoint files.

1. Durability: write_dir_atomically fsyncs the files, then the directory holding them (its entries), before
   the rename; without the directory fsync a power loss could keep the renamed directory but lose entries
   such as state.json (the checkpoint then silently vanishes from list_checkpoints after pruning removed
   the older ones). The parent is fsynced after the rename.
2. A complete-looking checkpoint with an unreadable tensors.safetensors is refused with a ValueError naming
   it (the CLI prints ValueErrors as one line), as an unreadable state.json already was; it raised
   safetensors' own SafetensorError.
3. SlicedLRAdamW (two param groups, a slice at another rate) continues bitwise after a checkpoint round trip.
"""
import os

import pytest
import torch

import hydra_kernels.integrations.checkpoint as ckpt
from hydra_kernels.rlhf.checkpoint import (copy_params_, latest_checkpoint, load_checkpoint, save_checkpoint,
                                           write_dir_atomically)
from hydra_kernels.rlhf.optim import SlicedLRAdamW


def test_directory_entries_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(ckpt, "fsync_path", lambda p: events.append(("fsync", os.fspath(p))))
    real_replace = os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: events.append(("rename", os.fspath(a))) or real_replace(a, b))

    def fill(tmp):
        (tmp / "a.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"x")
    out = write_dir_atomically(tmp_path / "final", fill)
    rename = next(i for i, e in enumerate(events) if e[0] == "rename")
    tmp = events[rename][1]
    before = {p for kind, p in events[:rename] if kind == "fsync"}
    assert {os.path.join(tmp, "a.json"), os.path.join(tmp, "sub", "b.bin"), os.path.join(tmp, "sub"), tmp} <= before
    assert ("fsync", os.fspath(tmp_path)) in events[rename:]
    assert (out / "sub" / "b.bin").read_bytes() == b"x"


def _params_opt():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(2, 3, 4)), torch.nn.Parameter(torch.randn(5))
    opt = SlicedLRAdamW([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.03}], lr=0.1, weight_decay=0.01,
                        slice_ratios=[(a, 1, 0.25)])
    return {"a": a, "b": b}, opt


def _step(ps, opt):
    opt.zero_grad()
    ((ps["a"] ** 3).sum() + (ps["b"].sin() * ps["a"].sum()).sum()).backward()
    opt.step()


def test_sliced_adamw_round_trip_continues_bitwise(tmp_path):
    ps, opt = _params_opt()
    _step(ps, opt)
    _step(ps, opt)
    save_checkpoint(tmp_path, 2, ps, opt, {}, {})
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    ps2, opt2 = _params_opt()
    copy_params_(ps2, ck.params, "ck")
    opt2.load_state_dict(ck.optimizer_state)
    assert [g["lr"] for g in opt2.param_groups] == [0.1, 0.03]
    for _ in range(3):
        _step(ps, opt)
        _step(ps2, opt2)
    assert all(torch.equal(ps[k], ps2[k]) for k in ps)


def test_unreadable_tensors_file_is_a_named_value_error(tmp_path):
    ps, opt = _params_opt()
    path = save_checkpoint(tmp_path, 1, ps, opt, {}, {})
    f = path / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="step-00000001.*not a readable checkpoint"):
        load_checkpoint(path)
