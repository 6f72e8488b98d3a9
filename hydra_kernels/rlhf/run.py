"""One training run on disk, as Hydra-SFT and PPO share it (Run), and the seeds a run derives from run.seed.

    run = Run(cfg, marker="policy.json", foreign=("sft.json",))      # output_dir/final checked up front
    run.inputs = inputs_digest(...)                                  # what the run starts from
    start, state = run.start(params, optimizer, check=...)          # resumes the latest checkpoint, if any
    with run.logging(history, total, start, desc):                  # metrics (run.report_to), progress bar
        ... run.log(metrics); run.checkpoint(done, params, optimizer, state) when run.due(done); run.tick()
    run.save_final(save_fn, ...)
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import sys
from pathlib import Path
from typing import Callable

import torch

from hydra_kernels.integrations.checkpoint import check_replaceable
from hydra_kernels.rlhf import distributed
from hydra_kernels.rlhf.checkpoint import (Checkpoint, CheckpointSchedule, check_resume_config, check_resume_inputs,
                                           copy_params_, latest_checkpoint, load_checkpoint, restore_rng,
                                           save_checkpoint)
from hydra_kernels.rlhf.config import config_to_dict
from hydra_kernels.rlhf.logging import MetricsLogger, check_reporters, notice


def derived_seed(seed: int, step: int, salt: int) -> int:
    """A seed for (run seed, step, purpose) without any global state."""
    return ((seed * 1_000_003 + step) * 16 + salt) % (2 ** 63)


def row_generators(seed: int, step: int, rows: range, device: torch.device) -> list[torch.Generator]:
    """The sampling generators of `rows` of step `step`'s batch, one per row, keyed by (seed, step, row): a row's
    sample does not depend on which rows share its batch, hence on the number of processes."""
    base = derived_seed(seed, step, 2)
    return [torch.Generator(device=device).manual_seed(derived_seed(base, row, 2)) for row in rows]


def seed_everything(seed: int) -> None:
    """Seed python, torch (CPU and CUDA) and numpy (if imported): LoRA A matrices are drawn from the global
    generator when a model is patched, so the same run.seed must give the same initial adapters."""
    random.seed(seed)
    torch.manual_seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % 2 ** 32)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what was measured): on a GPU, torch.cuda.max_memory_allocated, reset at the start of every step
    (so it is that step's peak); on CPU, the process's peak resident set size since it started (ru_maxrss,
    never reset: a running maximum)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


class Run:
    """The files of one run under cfg.run.output_dir: checkpoints/ (resume), the metrics JSONL (one line per
    step or epoch), final/ (the result, written once the run completes); and the progress bar.

    Under several processes (rlhf.distributed) every rank makes the same calls; rank 0 alone writes files,
    reports metrics and shows the bar (a failure there raises on every rank), every rank keeps the history,
    and the config saved with checkpoints and metrics records "world_size".

    cfg: an SFTConfig or PPOConfig. marker / foreign: the marker file of this kind of result and those of other
    kinds; an output_dir whose final/ holds something else than an earlier result of this kind raises
    ValueError (naming run.output_dir) here, before any work. Set `inputs` (checkpoint.inputs_digest) before
    `start`: checkpoints store it, and one of a run on other inputs is refused.
    """

    def __init__(self, cfg, *, marker: str, foreign: tuple[str, ...]):
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.final = self.out / "final"
        self.checkpoints = self.out / "checkpoints"
        self.metrics_path = self.out / cfg.run.metrics_file
        check_replaceable(self.final, name="run.output_dir", marker=marker, foreign=foreign)
        check_reporters(cfg.run.report_to)
        self.inputs: dict[str, str] = {}
        self.world_size = distributed.world_size()
        self.config = {**config_to_dict(cfg), "world_size": self.world_size}
        self.history: list[dict] = []
        self.schedule: CheckpointSchedule | None = None
        self._log = self._bar = self._logger = None

    def start(self, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, *,
              check: Callable[[Checkpoint], None] | None = None) -> tuple[int, dict | None]:
        """Create output_dir; with run.resume, continue its latest checkpoint: refuse one of other settings or
        inputs (ValueError naming run.output_dir), then `check(checkpoint)` (the caller's length checks), then
        restore params, optimizer and RNGs. Returns (steps done, the trainer state saved with it), or (0, None)
        for a fresh start. The checkpoint schedule starts now."""
        self.out.mkdir(parents=True, exist_ok=True)
        start, state = 0, None
        last = latest_checkpoint(self.checkpoints) if self.cfg.run.resume else None
        if last is not None:
            ck = load_checkpoint(last)
            check_resume_config(ck.config, config_to_dict(self.cfg), last, config_to_dict(type(self.cfg)()))
            check_resume_inputs(ck.trainer_state.get("inputs"), self.inputs, last)
            if check is not None:
                check(ck)
            copy_params_(params, ck.params, str(last))
            optimizer.load_state_dict(ck.optimizer_state)
            restore_rng(ck.rng_meta, ck.rng_tensors)
            start, state = ck.step, ck.trainer_state
            notice(f"resuming from step {start} ({last})")
        distributed.agree(self.inputs, "model.path")
        distributed.agree(start, "run.output_dir")
        self.schedule = CheckpointSchedule(self.cfg.run.checkpoint_every, self.cfg.run.checkpoint_minutes)
        return start, state

    def read_metrics(self, upto: int) -> list[dict]:
        """The metrics lines of steps ≤ upto in the metrics file (a resumed run rewrites the steps after its
        checkpoint); [] when upto is 0."""
        if not upto or not self.metrics_path.is_file():
            return []
        with open(self.metrics_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        return [r for r in records if r.get("step", 0) <= upto]

    @contextlib.contextmanager
    def logging(self, history: list[dict], total: int, initial: int, desc: str):
        """Within: the metrics file holds exactly `history` (rewritten atomically), then one line per `log`, and
        the other reporters of run.report_to get the same (rlhf.logging.MetricsLogger); with run.progress, a
        progress bar of `total` steps from `initial`. All are closed on exit."""
        self.history = list(history)
        if not distributed.is_main():
            yield self
            return
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        with open(tmp, "w") as f:
            for rec in self.history:
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, self.metrics_path)
        try:
            with open(self.metrics_path, "a") as self._log:
                self._logger = MetricsLogger(self.cfg.run, self.out, history=self.history, initial_step=initial,
                                             config=self.config)
                if self.cfg.run.progress:
                    from tqdm.auto import tqdm
                    self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step")
                yield self
        finally:
            if self._bar is not None:
                self._bar.close()
            if self._logger is not None:
                self._logger.close()
            self._log = self._bar = self._logger = None

    def log(self, metrics: dict) -> None:
        """Append one metrics record (with "world_size") to the file (flushed) and to `history`, and report it
        (run.report_to)."""
        metrics["world_size"] = self.world_size
        self.history.append(metrics)
        if self._log is not None:
            self._log.write(json.dumps(metrics) + "\n")
            self._log.flush()
            self._logger.log(metrics)

    def tick(self, **postfix) -> None:
        """One step of the progress bar; postfix: values to show next to it (floats with 3 decimals)."""
        if self._bar is not None:
            self._bar.update(1)
            if postfix:
                self._bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in postfix.items()})

    def due(self, done: int) -> bool:
        """A checkpoint is due after `done` steps (run.checkpoint_every / run.checkpoint_minutes; rank 0's
        clock decides for every rank)."""
        return distributed.from_rank0(self.schedule.due(done))

    def checkpoint(self, done: int, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                   trainer_state: dict) -> Path:
        """Write the checkpoint after `done` steps (with the config and `inputs`), keep the newest
        run.keep_checkpoints."""
        path = distributed.on_rank0(save_checkpoint, self.checkpoints, done, params, optimizer, self.config,
                                    {**trainer_state, "inputs": self.inputs}, keep=self.cfg.run.keep_checkpoints)
        self.schedule.saved()
        return path

    def save_final(self, save: Callable[..., Path], *args, **kwargs) -> Path:
        """save(output_dir/final, *args, **kwargs) on rank 0: the run's result, once it is complete."""
        return distributed.on_rank0(save, self.final, *args, **kwargs)


__all__ = ["Run", "derived_seed", "row_generators", "seed_everything", "peak_memory"]
