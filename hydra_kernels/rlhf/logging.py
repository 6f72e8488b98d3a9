"""Where a run's metrics go besides its metrics JSONL (run.report_to, as transformers' TrainingArguments.report_to),
and the one-line notices a run prints on stderr.

    logger = MetricsLogger(cfg.run, out_dir, history=records_so_far, initial_step=start, config=cfg_dict)
    logger.log({"step": 3, "loss/policy_avg": 0.1, ...}); logger.close()

"jsonl" is the run's metrics file, written by rlhf.run.Run whatever report_to says (resume reads it); "csv",
"tensorboard" and "wandb" are the MetricsLogger's, through the libraries themselves (torch.utils.tensorboard or
tensorboardX; wandb). A reporter whose library is missing is a ValueError naming run.report_to and the package.
"""
from __future__ import annotations

import csv
import math
import numbers
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from hydra_kernels.rlhf.distributed import is_main

CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


def notice(message: str) -> None:
    """One line for the person running the job, on stderr (never on stdout, which the CLI keeps for its JSON);
    under several processes from rank 0 only (every rank would say the same)."""
    if is_main():
        print(f"hydra-rlhf: {message}", file=sys.stderr, flush=True)


def _scalars(metrics: dict) -> dict[str, float]:
    """The finite numbers of a record, bools and "step" left out: what a tracker plots."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)}


def _summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter (needs the tensorboard package) or tensorboardX's; ValueError
    naming run.report_to when neither is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter
    except ImportError:
        pass
    try:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    except ImportError:
        raise ValueError("run.report_to: 'tensorboard' needs the tensorboard package (pip install tensorboard) or "
                         "tensorboardX (pip install tensorboardX)") from None


def _wandb():
    try:
        import wandb
    except ImportError:
        raise ValueError("run.report_to: 'wandb' needs the wandb package (pip install wandb)") from None
    return wandb


def check_reporters(report_to: Sequence[str]) -> None:
    """ValueError naming run.report_to (and the pip package) if a reporter's library is not installed: called
    before any work, so that a run does not fail at its first log."""
    if "tensorboard" in report_to:
        _summary_writer_class()
    if "wandb" in report_to:
        _wandb()


class _CsvWriter:
    """metrics.csv: one row per record, one column per key ever logged (a new key rewrites the file with the
    wider header, atomically); None as an empty cell. The file is first rewritten (to the history and the new
    record) at the first record, so an earlier run's stays until this one has something to replace it with."""

    def __init__(self, path: Path, history: list[dict]):
        self.path = path
        self.rows = list(history)
        self.header: list[str] = []
        self.written = False

    def _columns(self, rows) -> list[str]:
        cols = list(self.header)
        for r in rows:
            cols += [k for k in r if k not in cols]
        return cols

    def _rewrite(self) -> None:
        self.header = self._columns(self.rows)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.header, restval="")
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def log(self, metrics: dict) -> None:
        self.rows.append(metrics)
        if not self.written or any(k not in self.header for k in metrics):
            self._rewrite()
            self.written = True
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.header, restval="").writerow(metrics)

    def close(self) -> None:
        pass


class _TensorBoardWriter:
    """Event files under <output_dir>/tensorboard, one scalar per number, at the record's step. Every session
    purges the events after the step it starts from (purge_step): a resumed run those after its checkpoint,
    which it logs again; a fresh start all of an earlier run's. Its file's name ends in the session's start time
    in ns: the library names files by the second, and a second session within that second would truncate the
    first one's file."""

    def __init__(self, log_dir: Path, initial_step: int):
        cls = _summary_writer_class()
        self.writer = cls(str(log_dir), purge_step=initial_step + 1, filename_suffix=f".{time.time_ns()}")

    def log(self, metrics: dict, step: int) -> None:
        for k, v in _scalars(metrics).items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandbWriter:
    """A wandb run in <output_dir> (project: $WANDB_PROJECT or hydra-rlhf), offline unless $WANDB_MODE says
    otherwise, so a machine without network (or credentials) still runs; `wandb sync` uploads it later."""

    def __init__(self, out_dir: Path, config: dict | None):
        wandb = _wandb()
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "hydra-rlhf"), name=out_dir.name,
                              dir=str(out_dir), config=config, mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """The reporters of run.report_to other than jsonl, for one logging session of a run.

    run_cfg: a RunConfig (report_to); out_dir: run.output_dir; history: the records already logged (a resumed
    run's, rewritten into metrics.csv); initial_step: the step the session resumes after (0: a fresh run);
    config: the run's settings as plain data (wandb's run config). Raises ValueError naming run.report_to when a
    reporter's library is missing. A record's step is its "step" entry, else its position in the run.
    """

    def __init__(self, run_cfg, out_dir: str | os.PathLike, *, history: Sequence[dict] = (), initial_step: int = 0,
                 config: dict | None = None):
        out = Path(out_dir)
        report_to = [run_cfg.report_to] if isinstance(run_cfg.report_to, str) else list(run_cfg.report_to)
        check_reporters(report_to)
        self.count = len(history)
        self.csv = _CsvWriter(out / CSV_FILE, list(history)) if "csv" in report_to else None
        self.trackers = []
        try:
            if "tensorboard" in report_to:
                self.trackers.append(_TensorBoardWriter(out / TENSORBOARD_DIR, initial_step))
            if "wandb" in report_to:
                self.trackers.append(_WandbWriter(out, config))
        except BaseException:
            self.close()
            raise

    def log(self, metrics: dict) -> None:
        """Report one record to every reporter."""
        self.count += 1
        step = metrics.get("step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else self.count
        if self.csv is not None:
            self.csv.log(metrics)
        for t in self.trackers:
            t.log(metrics, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []


__all__ = ["MetricsLogger", "check_reporters", "notice", "CSV_FILE", "TENSORBOARD_DIR"]
