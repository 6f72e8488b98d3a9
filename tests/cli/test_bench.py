"""`hydra-rlhf bench NAME ...` runs bench/<script> with the options after NAME and returns its exit status."""
import json
import os

import pytest

from hydra_kernels import cli as cli_mod
from tests.cli._local import cli


def test_runs_the_benchmark_with_its_options(tmp_path):
    proc = cli("bench", "decode", "--cpu", "--quick", "--new-tokens", "2", "--reps", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (js,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert json.load(open(tmp_path / js))["settings"]["new_tokens"] == 2


def test_every_name_has_its_script():
    for name, script in cli_mod.BENCHES.items():
        assert os.path.exists(os.path.join(cli_mod.BENCH_DIR, script)), name


def test_the_scripts_own_errors_come_back():
    proc = cli("bench", "decode", "--new-tokens", "0")
    assert proc.returncode == 2 and "--new-tokens" in proc.stderr


def test_without_a_source_checkout_says_where_benchmarks_live(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli_mod, "BENCH_DIR", str(tmp_path / "nowhere"))
    assert cli_mod.main(["bench", "ppo", "--quick"]) == 2
    assert "benchmarks live in bench/ of a source checkout" in capsys.readouterr().err


def test_unknown_name_is_refused():
    with pytest.raises(SystemExit):
        cli_mod.main(["bench", "nope"])
