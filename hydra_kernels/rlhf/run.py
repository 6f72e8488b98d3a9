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
import warnings
from pathlib import Path
from typing import Callable

import torch

from hydra_kernels.integrations.checkpoint import check_replaceable, remove_leftovers
from hydra_kernels.integrations.fsdp import full_optimizer_state, full_state_dict, is_sharded, load_optimizer_state_
from hydra_kernels.rlhf import distributed
from hydra_kernels.rlhf.checkpoint import (CHECKPOINT_MARKER, Checkpoint, CheckpointSchedule, check_optimizer_state,
                                           check_resume_config, check_resume_inputs, copy_params_, latest_checkpoint,
                                           load_checkpoint, restore_rng, save_checkpoint)
from hydra_kernels.rlhf.checkpoint import PREFIX as CHECKPOINT_PREFIX
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
        self.metrics_path = metrics_path(self.out, cfg.run.metrics_file)
        check_replaceable(self.final, name="run.output_dir", marker=marker, foreign=foreign)
        self.marker = marker
        check_reporters(cfg.run.report_to)
        self.inputs: dict[str, str] = {}
        self.world_size = distributed.world_size()
        self.config = {**config_to_dict(cfg), "world_size": self.world_size}
        self.history: list[dict] = []
        self.schedule: CheckpointSchedule | None = None
        self.last_checkpoint: Path | None = None
        self.last_resumed: Path | None = None           # the checkpoint `start` resumed from
        self._log = self._bar = self._logger = None
        self._defer = self._in_logging = False

    def start(self, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, *,
              check: Callable[[Checkpoint], None] | None = None) -> tuple[int, dict | None]:
        """Create output_dir; with run.resume, continue its latest checkpoint: refuse one of other settings or
        inputs (ValueError naming run.output_dir), then `check(checkpoint)` (the caller's length checks), then
        restore params, optimizer and RNGs. Returns (steps done, the trainer state saved with it), or (0, None)
        for a fresh start. The checkpoint schedule starts now."""
        self.out.mkdir(parents=True, exist_ok=True)
        # What a kill during an earlier session's directory swap left: never a result, never resumed from.
        if distributed.is_main():
            remove_leftovers(self.out, "final", marker=self.marker)
            remove_leftovers(self.checkpoints, f"{CHECKPOINT_PREFIX}*", marker=CHECKPOINT_MARKER)
        start, state = 0, None
        last = latest_checkpoint(self.checkpoints) if self.cfg.run.resume else None
        if last is not None:
            ck = load_checkpoint(last)
            check_resume_config(ck.config, config_to_dict(self.cfg), last, config_to_dict(type(self.cfg)()))
            check_resume_inputs(ck.trainer_state.get("inputs"), self.inputs, last)
            if check is not None:
                check(ck)
            copy_params_(params, ck.params, str(last))
            check_optimizer_state(ck.optimizer_state, optimizer, last)
            load_optimizer_state_(optimizer, ck.optimizer_state)      # sharded like its parameter under FSDP2
            restore_rng(ck.rng_meta, ck.rng_tensors)
            start, state = ck.step, ck.trainer_state
            self.last_resumed = last
            notice(f"resuming from step {start} ({last})")
        distributed.agree(self.inputs, "model.path")
        distributed.agree(start, "run.output_dir")
        self.schedule = CheckpointSchedule(self.cfg.run.checkpoint_every, self.cfg.run.checkpoint_minutes)
        return start, state

    def read_metrics(self, upto: int) -> list[dict]:
        """The metrics lines of steps ≤ upto in the metrics file (a resumed run rewrites the steps after its
        checkpoint); [] when upto is 0. An incomplete last line (a kill or a full disk mid-write: no newline
        after it) is dropped with a warning; any other line that is not a JSON object is a ValueError naming
        file:line."""
        if not upto or not self.metrics_path.is_file():
            return []
        return [r for r in read_metrics_file(self.metrics_path) if r.get("step", 0) <= upto]

    @contextlib.contextmanager
    def logging(self, history: list[dict], total: int, initial: int, desc: str):
        """Within: one metrics line per `log`, after `history`, and the other reporters of run.report_to get the
        same (rlhf.logging.MetricsLogger); with run.progress, a progress bar of `total` steps from `initial`.
        All are closed on exit.

        The metrics file is rewritten to `history` (atomically) when this session has something to replace it
        with: a resumed run (initial > 0) at its first `log` (the lines after its checkpoint are of the killed
        session it repeats); a fresh start over an earlier run's file (run.resume=false) at its first
        checkpoint, its records held until then, since the earlier run's checkpoints stay the ones to resume
        from (with the history they go with) until this run writes one; and on a normal exit."""
        self.history = list(history)
        if not distributed.is_main():                   # rank 0 alone writes and reports
            yield self
            return
        self._defer = initial == 0 and self.metrics_path.is_file() and self.metrics_path.stat().st_size > 0
        self._in_logging = True
        try:
            self._logger = MetricsLogger(self.cfg.run, self.out, history=self.history, initial_step=initial,
                                         config=self.config)
            if self.cfg.run.progress:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step")
            yield self
            if self._log is None:
                self._rewrite_metrics(self.history)
        finally:
            if self._log is not None:
                self._log.close()
            if self._bar is not None:
                self._bar.close()
            if self._logger is not None:
                self._logger.close()
            self._log = self._bar = self._logger = None
            self._in_logging = False

    def _open_metrics(self) -> None:
        """Rewrite the metrics file to `history`, then keep it open for appending."""
        self._rewrite_metrics(self.history)
        self._log = open(self.metrics_path, "a")
        self._defer = False

    def _rewrite_metrics(self, records: list[dict]) -> None:
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, self.metrics_path)          # replaces a symlink itself, never writes through it

    def log(self, metrics: dict) -> None:
        """Append one metrics record (with "world_size") to the file (flushed) and to `history`, and report it
        (run.report_to; rank 0 only)."""
        metrics["world_size"] = self.world_size
        self.history.append(metrics)
        if self._logger is None:                        # another rank than 0
            return
        if self._log is None and not self._defer:
            self._open_metrics()                    # holds `history`, this record included
        elif self._log is not None:
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
        opt_state = optimizer
        if any(is_sharded(p) for p in params.values()):      # FSDP2: gathered on every rank, rank 0 writes
            params, opt_state = full_state_dict(params), full_optimizer_state(optimizer)
        path = distributed.on_rank0(save_checkpoint, self.checkpoints, done, params, opt_state, self.config,
                                    {**trainer_state, "inputs": self.inputs}, keep=self.cfg.run.keep_checkpoints)
        self.schedule.saved()
        self.last_checkpoint = path
        if self._in_logging and self._log is None:
            self._open_metrics()                    # an earlier run's history may go now: this run can resume
        return path

    def save_final(self, save: Callable[..., Path], *args, **kwargs) -> Path:
        """save(output_dir/final, *args, **kwargs) on rank 0: the run's result, once it is complete. A write that fails
        (OSError, safetensors' error: a full disk, a file size limit) raises OSError naming final/ and the
        checkpoint the run resumes from; a ValueError (a non-finite weight, a directory that may not be
        replaced) passes unchanged."""
        from safetensors import SafetensorError
        try:
            return distributed.on_rank0(save, self.final, *args, **kwargs)
        except (OSError, SafetensorError) as e:
            if self.last_checkpoint is not None:
                how = (f"the run is checkpointed after its last step ({str(self.last_checkpoint)!r}): run it "
                       f"again with run.resume=true (the default) to write final/ without training again")
            else:
                how = "no checkpoint holds the last step; the run has to be repeated"
            message = f"run.output_dir: writing {str(self.final)!r} failed ({type(e).__name__}: {e}); {how}"
            errno = getattr(e, "errno", None)
            raise (OSError(errno, message) if errno is not None else OSError(message)) from e


def metrics_path(out: Path, metrics_file: str) -> Path:
    """out/metrics_file, refused (ValueError naming run.metrics_file) unless it stays inside out once every
    symbolic link on the way is followed: no "..", no absolute path elsewhere, no link that leads out."""
    path = out / metrics_file
    base = Path(os.path.realpath(out))
    real = Path(os.path.realpath(path))
    if real == base or base not in real.parents or path.is_dir():
        raise ValueError(f"run.metrics_file: {metrics_file!r} must name a file inside run.output_dir "
                         f"({str(out)!r}); it resolves to {str(real)!r}")
    return path


def read_metrics_file(path: Path) -> list[dict]:
    """The records of a metrics JSONL; see Run.read_metrics for an incomplete last line and bad lines."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().split("\n")
    # After the last "\n": "" for a complete file, else a line cut short by a kill or a full disk.
    *whole, tail = lines
    if tail.strip():
        warnings.warn(f"run.metrics_file: {str(path)!r} line {len(lines)} is incomplete (no newline after it; "
                      f"a run stopped mid-write); dropped", RuntimeWarning, stacklevel=3)
    records = []
    for i, line in enumerate(whole, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ValueError(f"run.metrics_file: {path}:{i} is not valid JSON ({e}); fix or remove that "
                             f"line") from None
        if not isinstance(rec, dict):
            raise ValueError(f"run.metrics_file: {path}:{i} is not a JSON object (got {type(rec).__name__})")
        records.append(rec)
    return records


__all__ = ["Run", "derived_seed", "row_generators", "seed_everything", "peak_memory"]
