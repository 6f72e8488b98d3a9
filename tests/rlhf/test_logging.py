"""run.report_to: the metrics JSONL, metrics.csv and TensorBoard event files (written by the library, read back
here) of a PPO run, also across a resume; wandb offline by default; a missing library named with its package."""
import csv
import glob
import json
import math
import struct
import sys
import types

import pytest

from hydra_kernels.rlhf.config import RunConfig
from hydra_kernels.rlhf.logging import MetricsLogger, check_reporters
from hydra_kernels.rlhf.ppo import TRL_METRICS
from tests.rlhf._ppo_job import run


def _tensorboard_available() -> bool:
    try:
        from hydra_kernels.rlhf.logging import _summary_writer_class
        _summary_writer_class()
        return True
    except ValueError:
        return False


needs_tensorboard = pytest.mark.skipif(not _tensorboard_available(), reason="neither tensorboard nor tensorboardX")


def read_scalars(log_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the event files in log_dir: with tensorboard's EventAccumulator when it is
    installed, else by reading the TFRecord frames with tensorboardX's Event protobuf (a resumed writer's
    purge event drops the earlier events at or after its step, as TensorBoard does)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        EventAccumulator = None
    if EventAccumulator is not None:
        acc = EventAccumulator(str(log_dir))
        acc.Reload()
        return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    from tensorboardX.proto import event_pb2
    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(f"{log_dir}/events.out.tfevents.*")):
        data = open(path, "rb").read()
        i = 0
        while i < len(data):
            n, = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4                  # length, its crc, the record, its crc
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                for steps in out.values():
                    for s in [s for s in steps if s >= ev.step]:
                        del steps[s]
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def _jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_reports(out, rows):
    """metrics.csv holds every JSONL record (numbers as written), TensorBoard every finite number at its step."""
    table = _csv_rows(out / "metrics.csv")
    assert len(table) == len(rows)
    for rec, row in zip(rows, table):
        for k, v in rec.items():
            if v is None:
                assert row[k] == ""
            elif isinstance(v, bool) or isinstance(v, str):
                assert row[k] == str(v)
            else:
                assert float(row[k]) == pytest.approx(v, rel=1e-12), k
    if (out / "tensorboard").is_dir():
        scalars = read_scalars(out / "tensorboard")
        for k in TRL_METRICS:
            assert k in scalars, k
        for rec in rows:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    assert scalars[k][rec["step"]] == pytest.approx(v, rel=1e-6), (k, rec["step"])
        assert all(sorted(steps) == [r["step"] for r in rows if k in r] for k, steps in scalars.items())


@needs_tensorboard
def test_ppo_reports_to_jsonl_csv_and_tensorboard_at_once(tmp_path):
    _, res = run(tmp_path, ["run.report_to=[jsonl,csv,tensorboard]", "steps=2"])
    rows = _jsonl(tmp_path / "metrics.jsonl")
    assert rows == res.history and [r["step"] for r in rows] == [1, 2]
    for k in TRL_METRICS:
        assert all(k in r for r in rows), k
    assert rows[0]["lr"] == pytest.approx(0.01) and rows[0]["eps"] > 0
    _check_reports(tmp_path, rows)


@needs_tensorboard
def test_resumed_run_reports_each_step_once(tmp_path):
    """Killed after step 3 (checkpoint at 2), resumed: step 3 is logged again and its first events purged."""
    def kill_at_3(step, metrics):
        if step == 3:
            raise KeyboardInterrupt("killed")
    extra = ["run.report_to=[csv,tensorboard]", "steps=4", "run.checkpoint_every=2"]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, extra, callback=kill_at_3)
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    _, res = run(tmp_path, extra)
    rows = _jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows == res.history
    _check_reports(tmp_path, rows)


def test_csv_widens_its_header_when_a_new_key_appears(tmp_path):
    logger = MetricsLogger(RunConfig(report_to=["csv"]), tmp_path, history=[{"step": 1, "a": 1.5}])
    logger.log({"step": 2, "a": 2.5, "b": "x", "c": None})
    logger.log({"step": 3, "b": "y"})
    logger.close()
    assert _csv_rows(tmp_path / "metrics.csv") == [{"step": "1", "a": "1.5", "b": "", "c": ""},
                                                   {"step": "2", "a": "2.5", "b": "x", "c": ""},
                                                   {"step": "3", "a": "", "b": "y", "c": ""}]


def test_wandb_runs_offline_unless_wandb_mode_says_otherwise(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = MetricsLogger(RunConfig(report_to=["wandb"]), tmp_path / "exp", config={"lr": 0.1})
    logger.log({"step": 7, "loss/policy_avg": 0.5, "skipped": False, "memory/peak_source": "cpu", "x": None})
    logger.close()
    assert calls[0][0] == "init" and calls[0][1]["mode"] == "offline" and calls[0][1]["config"] == {"lr": 0.1}
    assert calls[0][1]["dir"] == str(tmp_path / "exp")
    assert calls[1] == ("log", {"loss/policy_avg": 0.5}, 7) and calls[2] == ("finish",)
    monkeypatch.setenv("WANDB_MODE", "online")
    MetricsLogger(RunConfig(report_to=["wandb"]), tmp_path).close()
    assert calls[3][1]["mode"] == "online"


def test_a_missing_library_is_named_with_its_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)              # import wandb raises ImportError
    with pytest.raises(ValueError, match=r"^run.report_to: 'wandb' needs the wandb package \(pip install wandb\)"):
        check_reporters(["jsonl", "wandb"])
    for name in ("torch.utils.tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ValueError, match=r"^run.report_to: 'tensorboard' needs the tensorboard package "
                                         r"\(pip install tensorboard\) or tensorboardX"):
        check_reporters(["tensorboard"])
    check_reporters(["jsonl", "csv"])


def test_a_missing_library_stops_the_run_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match=r"^run.report_to: 'wandb'"):
        run(tmp_path / "out", ["run.report_to=[jsonl,wandb]"])
    assert not (tmp_path / "out").exists()


def test_report_to_setting():
    from hydra_kernels.rlhf.config import PPOConfig, load_config
    assert PPOConfig(run=RunConfig(report_to="csv")).run.report_to == ["csv"]
    assert load_config(PPOConfig, None, ["run.report_to=[tensorboard,jsonl,tensorboard]"]).run.report_to == \
        ["tensorboard", "jsonl"]
    with pytest.raises(ValueError, match=r"^run.report_to: must be a name or a list of jsonl, csv, tensorboard"):
        load_config(PPOConfig, None, ["run.report_to=mlflow"])
