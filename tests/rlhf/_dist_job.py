"""Distributed runs for tests/rlhf/test_distributed.py, started by tests._util.torchrun (gloo on the CPU).

    torchrun --nproc_per_node N tests/rlhf/_dist_job.py MODE OUT [args]

equiv OUT     PPO (hydra, j-hydra, lora, full; 2 steps), GRPO (4 estimators; 2 steps) and Hydra-SFT (lora and
              full; 2 steps) into OUT/<name>/
              (result.safetensors: the trained tensors; history.json: the metrics), a hydra run stopped after
              step 1 (OUT/stopped: its checkpoint), and the rank-0 gate's error broadcast; every rank checks that
              all ranks hold the same trained tensors; the rank-0 gate and the gradient engine's checks.
resume DIR    continue DIR (a stopped run of `equiv`, at any world size) to 2 steps; result into DIR/result.
fsdp2 OUT     as equiv for PPO (hydra, j-hydra, lora, full; each also exported as the CLI does: merged policy,
              PEFT adapter, samples), GRPO, Hydra-SFT (lora, full) and the stopped hydra run, with
              run.parallel=fsdp2 at 2 processes and none at 1 (the reference); trained tensors gathered first.
resume-fsdp2 DIR   as resume, with run.parallel=fsdp2 at 2 processes and none at 1.
fail OUT [k=v ...]  PPO whose reward function raises on the last rank only: the job must fail, not hang.

The process group is initialised here with a short timeout, so a rank left waiting fails within it.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hydra_kernels.integrations.fsdp import any_sharded, full_state_dict  # noqa: E402
from hydra_kernels.rlhf import distributed  # noqa: E402
from hydra_kernels.rlhf.config import SFTConfig, load_config  # noqa: E402
from hydra_kernels.rlhf.data import PreferencePair, SFTExample  # noqa: E402
from hydra_kernels.rlhf.sft import hydra_sft  # noqa: E402
from tests.rlhf import _grpo_job, _ppo_job  # noqa: E402
from tests.rlhf._tiny import CharTokenizer, tiny_model  # noqa: E402

TOK = CharTokenizer()
DEMOS = [SFTExample(f"{a}+{b}=", str(a + b)) for a in range(4) for b in range(2)]
PAIRS = [PreferencePair(f"{a}+{b}=", str(a + b), "+") for a in range(3) for b in range(2)]
VARIANTS = ("hydra", "j-hydra", "lora", "full")
# A loss aggregation and an advantage each: seq-mean-token-mean with the KL in the loss, token-mean with DAPO's
# group filter, the sequence loss with the KL in the reward, whitened returns-to-go with a group baseline.
ESTIMATORS = {"grpo": ["beta=0.04", "num_iterations=2"], "dapo": [], "rloo": [], "reinforce_pp_baseline": []}
# 3 groups of 4: at 2 processes the middle group is sampled half on each rank.
GRPO = ["batch_size=12", "num_generations=4", "mini_batch_size=4", "run.checkpoint_minutes=0"]
# 4 prompts per step, minibatches of 2 (one row per rank at 2 processes), per-token rewards whitened too.
PPO = ["run.checkpoint_minutes=0", "whiten_rewards=true", "adaptive_kl=true", "kl_horizon=100"]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _save(out: Path, tensors: dict[str, torch.Tensor], history: list[dict]) -> None:
    """Rank 0 writes; every rank first checks that all of them hold the same tensors (FSDP2's gathered)."""
    tensors = full_state_dict(tensors)
    distributed.agree(_digest(tensors), f"trained tensors of {out.name}")
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                  str(out / "result.safetensors"))
        (out / "history.json").write_text(json.dumps(history))


def _ppo(out: Path, *overrides: str):
    _, result = _ppo_job.run(out, [*PPO, *overrides])
    return result


def _sft(out: Path, mode: str, *overrides: str):
    cfg = load_config(SFTConfig, None, [f"mode={mode}", "epochs=1", "batch_size=4", "lr=0.01", "lora.r=4",
                                        "data.eval_fraction=0.34", "run.progress=false", "run.checkpoint_minutes=0",
                                        f"run.output_dir={out}", *overrides])
    result = hydra_sft(tiny_model(len(TOK)), TOK, DEMOS, PAIRS, cfg)
    tensors = {f"model.{k}": v for k, v in result.model.state_dict().items()}
    tensors.update({f"head.{k}": v for k, v in result.reward_head.state_dict().items()})
    return tensors, result.history


def _exports(out: Path, models) -> None:
    """What the CLI writes after training (--merge-to, --export-peft, --samples), as it calls them (cli._once:
    collective under fsdp2, rank 0 writes): into out/merged, out/base + out/peft (shared variants), and
    out/samples.json."""
    from hydra_kernels.cli import _once, _samples
    from hydra_kernels.integrations.checkpoint import save_merged
    from hydra_kernels.rlhf.config import PPOConfig
    path = _once(models, models.export_policy, out / "merged", None)
    assert path == out / "merged", path
    if models.shared:
        _once(models, save_merged, models.model, None, out / "base")      # export_peft names a base on disk
        _once(models, models.hydra.export_peft, "actor", out / "peft")
    samples = _once(models, _samples, models, TOK, ["1+1=", "2+0="], PPOConfig(max_new_tokens=3))
    if distributed.is_main():
        (out / "samples.json").write_text(json.dumps(samples))


def _gate_check() -> None:
    """on_rank0: a ValueError on rank 0 reaches every rank as a ValueError with its message."""
    def fail():
        raise ValueError("disk full on rank 0")
    try:
        distributed.on_rank0(fail)
    except ValueError as e:
        assert "disk full on rank 0" in str(e), e
    else:
        raise AssertionError("on_rank0 did not raise")
    assert distributed.on_rank0(lambda: distributed.rank() + 41) == 41      # rank 0's result everywhere


def _engine_check() -> None:
    """Replicated: rank 0's weights everywhere; gradients summed over ranks; a parameter with a gradient on some
    ranks only gets the sum (zeros elsewhere), one with none on any rank keeps None (AdamW then skips it)."""
    from hydra_kernels.rlhf.config import RunConfig
    r = distributed.rank()
    used = torch.nn.Parameter(torch.full((3,), float(r)))
    some = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    unused = torch.nn.Parameter(torch.ones(4))
    engine = distributed.wrap([used, some, unused], RunConfig(parallel="ddp"))
    assert torch.equal(used.detach(), torch.zeros(3))                 # rank 0's
    (used.sum() * (r + 1)).backward()
    if r == 0:
        (some * 2).sum().backward()
    engine.sync_grads()
    w = distributed.world_size()
    assert torch.equal(used.grad, torch.full((3,), w * (w + 1) / 2)), used.grad
    assert torch.equal(some.grad, torch.full((2,), 2.0, dtype=torch.float64)), some.grad
    assert unused.grad is None


def main(mode: str, out: str, *extra: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    out = Path(out)
    if mode == "equiv":
        _gate_check()
        _engine_check()
        if distributed.world_size() > 1:              # the global batch must split evenly over the ranks
            try:
                _ppo(out / "odd", "batch_size=3", "mini_batch_size=3")
            except ValueError as e:
                assert "batch_size: must be divisible by the number of processes (2), got 3" in str(e), e
            else:
                raise AssertionError("batch_size=3 at 2 processes was accepted")
        for variant in VARIANTS:
            res = _ppo(out / variant, f"variant={variant}")
            _save(out / variant / "result", res.models.named_trainable(), res.history)
        for est, extra in ESTIMATORS.items():
            _, res = _grpo_job.run(out / est, [*GRPO, f"estimator={est}", *extra])
            _save(out / est / "result", res.models.named_trainable(), res.history)
        for mode_ in ("lora", "full"):
            tensors, history = _sft(out / f"sft-{mode_}", mode_)
            _save(out / f"sft-{mode_}" / "result", tensors, history)
        _ppo(out / "stopped", "steps=1")
    elif mode == "fsdp2":
        parallel = f"run.parallel={'fsdp2' if distributed.world_size() > 1 else 'none'}"
        for variant in VARIANTS:
            res = _ppo(out / variant, f"variant={variant}", parallel)
            # Sharded indeed at 2 processes: every base copy's parameters are DTensors.
            assert all(any_sharded(m) == (distributed.world_size() > 1) for m in res.models.shardable()), variant
            _save(out / variant / "result", res.models.named_trainable(), res.history)
            _exports(out / variant, res.models)
        # j-hydra sampling the old log-probs and values (the value head gathered while decoding).
        res = _ppo(out / "j-hydra-sampled", "variant=j-hydra", "old_logprobs=rollout", parallel)
        _save(out / "j-hydra-sampled" / "result", res.models.named_trainable(), res.history)
        _, res = _grpo_job.run(out / "grpo", [*GRPO, "estimator=grpo", *ESTIMATORS["grpo"], parallel])
        _save(out / "grpo" / "result", res.models.named_trainable(), res.history)
        for mode_ in ("lora", "full"):
            tensors, history = _sft(out / f"sft-{mode_}", mode_, parallel)
            _save(out / f"sft-{mode_}" / "result", tensors, history)
        _ppo(out / "stopped", "steps=1", parallel)
    elif mode in ("resume", "resume-fsdp2"):
        parallel = "fsdp2" if mode == "resume-fsdp2" and distributed.world_size() > 1 else "null"
        res = _ppo(out, "steps=2", f"run.parallel={parallel}")
        _save(out / "result", res.models.named_trainable(), res.history)
    elif mode == "fail":
        def reward(prompts, completions, ended):
            if distributed.rank() == distributed.world_size() - 1:
                raise RuntimeError(f"reward function failed on rank {distributed.rank()}")
            return [0.0] * len(prompts)
        _ppo_job.run(out, [*PPO, "reward_source=function", *extra], reward_fn=reward)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(f"JOB OK rank {distributed.rank()} of {distributed.world_size()}", flush=True)
    distributed.shutdown()
    # The job's work is done and checked: skip the interpreter's teardown, in which torch's gloo threads can
    # abort the process on a loaded machine ("terminate called without an active exception", exit -6).
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
