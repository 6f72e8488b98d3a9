"""Run under torchrun (2 processes, gloo): saving a FSDP2-sharded HydraModel equals saving it on one process.

argv[1]: a directory shared by the ranks. Rank 0 writes the unsharded reference's files; every rank calls the
sharded model's save_pretrained, merge (the actor merged; the base as it is, tied embeddings included) and
export_peft, which rank 0 writes. The files must hold the same tensors and JSON, and load back into a
sharded model (load_adapters, load_peft: each rank copies its part) as the reference's tensors. A write that
fails on rank 0 (merge into a directory that is not the library's) raises ValueError on every rank instead of
leaving the others waiting. Prints "SAVE OK" at the end.
"""
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from hydra_kernels.integrations import HydraModel
from hydra_kernels.integrations.fsdp import full_state_dict, load_full_, shard
from tests.integrations._fsdp_job import build
from tests.integrations._models import make_model, randomize_adapters


def same_files(a: Path, b: Path, skip_keys=()):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()), (names, sorted(p.name for p in b.iterdir()))
    for name in names:
        if name.endswith(".safetensors"):
            x, y = load_file(str(a / name)), load_file(str(b / name))
            assert x.keys() == y.keys(), name
            for k in x:
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (name, k)
        elif name.endswith(".json") and not name.startswith("."):
            x, y = json.loads((a / name).read_text()), json.loads((b / name).read_text())
            for k in skip_keys:
                x.pop(k, None), y.pop(k, None)
            assert x == y, (name, x, y)


def write_every_kind(hydra, out: Path) -> None:
    hydra.save_pretrained(out / "hydra")
    hydra.merge("actor", out / "merged")
    hydra.merge(None, out / "base")                  # makes out/base the model's base directory on every rank
    hydra.export_peft("critic", out / "peft")


def save_like_one_process(ref, distributed_model, want: Path, got: Path, rank: int) -> None:
    """`ref` (whole, written by rank 0) and `distributed_model` (written collectively by every rank) save,
    merge and export the same files."""
    if rank == 0:
        write_every_kind(ref, want)
    write_every_kind(distributed_model, got)
    dist.barrier()
    if rank == 0:
        for what in ("hydra", "merged", "base"):
            same_files(want / what, got / what)
        same_files(want / "peft", got / "peft", skip_keys=("base_model_name_or_path",))


def merge_into_foreign_dir_fails_everywhere(hydra, foreign: Path, rank: int) -> None:
    """A merge into the user's own directory fails on rank 0 (it writes) and raises on every rank; the
    directory is left as it was."""
    if rank == 0:
        foreign.mkdir()
        (foreign / "notes.txt").write_text("mine")
    dist.barrier()
    try:
        hydra.merge("actor", foreign)
    except ValueError as e:
        assert "out_dir" in str(e), e
    else:
        raise AssertionError("merge into a foreign directory did not raise")
    assert (foreign / "notes.txt").read_text() == "mine"


def tied_hydra():
    torch.manual_seed(3)
    hydra = HydraModel.from_pretrained_base(make_model("qwen2"), adapters=("actor", "critic"), r=4, alpha=8)
    randomize_adapters(hydra.model, seed=4)
    return hydra


def main():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    root = Path(sys.argv[1])
    for tag, make in (("llama", build), ("qwen2-tied", tied_hydra)):
        ref, sharded = make(), shard(make())
        want, got = root / tag / "ref", root / tag / "sharded"
        save_like_one_process(ref, sharded, want, got, rank)
        # Loading into a sharded model: each rank copies its part (save_pretrained's and export_peft's files).
        loaded = shard(make())
        loaded.load_adapters(got / "hydra")
        loaded.load_peft("actor", got / "peft")           # the critic's adapter, now in the actor's slot too
        want_state, have_state = (full_state_dict({n: p for n, p in m.named_parameters() if p.requires_grad})
                                  for m in (ref, loaded))
        for n, t in want_state.items():
            if ".lora_" in n:
                t = t.clone()
                t[0] = t[1]                               # slot 0 (actor) now holds the critic's export
            assert torch.equal(have_state[n], t), n
        # The gather helper a training checkpoint takes, and its way back into the shards.
        state = full_state_dict({n: p for n, p in sharded.named_parameters() if p.requires_grad})
        for n, p in ref.named_parameters():
            if p.requires_grad:
                assert torch.equal(state[n], p.detach()), n
        with torch.no_grad():
            for n, p in sharded.named_parameters():
                if p.requires_grad:
                    load_full_(p, torch.zeros_like(state[n]) + 0.5)
        assert all(bool((t == 0.5).all()) for t in full_state_dict(
            {n: p for n, p in sharded.named_parameters() if p.requires_grad}).values())
    merge_into_foreign_dir_fails_everywhere(sharded, root / "users-own", rank)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: save_pretrained, merge and export_peft under FSDP2 equal one process; SAVE OK", flush=True)


if __name__ == "__main__":
    main()
