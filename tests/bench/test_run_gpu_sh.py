"""bench/run_gpu.sh without a GPU: stub `nvidia-smi` and `python3` on PATH, the script copied into a scratch tree.

The device call that runs a stage is killed at 600 s, so every stage must end in time however long its steps
run: each step's limit is cut to what is left of the stage's END (HK_RUN_GPU_END: 540 s for the default stage
`one`, 575 s for the others) and a step with no time left is skipped. Stage `one` (the default) also gives each
step its own share, packs the results after every step and prints the MET / MISSED table last;
HK_RUN_GPU_TIME_SCALE (percent) shrinks all of its times alike so that a whole call runs here in seconds.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "run_gpu.sh"
# What the script needs beside itself (copied into the scratch tree).
FILES = ["bench/run_gpu.sh", "bench/gpu_call.py", "bench/gpu_tests.txt"]
ONE = ["prepare", "tests_triton", "cuda_build", "tests_cuda", "lora", "logprobs", "linear_logprobs", "ppo",
       "grpo", "memory", "sweep_lora", "sweep_logprobs", "tune_cuda_lora"]       # status.txt order of stage one
ONE_STARTED = ["prepare", "cuda_build", "tests_triton", "tests_cuda", "lora", "logprobs", "linear_logprobs", "ppo",
               "sweep_lora", "sweep_logprobs", "tune_cuda_lora"]                 # the order the commands start
SHARES = {"prepare": 20, "cuda_build": 200, "tests_triton": 120, "tests_cuda": 45, "lora": 50, "logprobs": 25,
          "linear_logprobs": 70, "ppo": 160, "sweep_lora": 600, "sweep_logprobs": 600, "tune_cuda_lora": 600}
STAGES = {   # stage -> the steps it runs (status.txt names)
    "one": [f"{n} skipped (not available: bench/bench_{n}.py not built yet)" if n in ("grpo", "memory") else n
            for n in ONE],
    "tests": ["cuda_build", "gpu_tests", "demo_gpu"],
    "bench": ["bench_lora_quick", "bench_logprobs_quick", "tune_cuda_lora"],
    "lora": ["bench_lora_4096", "bench_lora_11008"],
    "logprobs": ["bench_logits", "bench_linear"],
    "ppo": ["bench_ppo"],
    "decode": ["cuda_build", "bench_decode"],
}

PYTHON3_STUB = r"""#!/usr/bin/env bash
# Logs "<epoch seconds> <step key> <args>", writes what the real command would leave (a results JSON with one
# target under --out DIR, a junit XML for --junitxml=FILE, env.json for gpu_call.py prepare), then sleeps
# STUB_SLEEP_<key> (or STUB_SLEEP) seconds. The summary is the real bench/gpu_call.py.
case "$*" in
  *"import sys, torch, triton, transformers"*) echo "python 3.12 torch 2.11.0+cu130 (stub)"; exit 0 ;;
  *"import xdist"*|*"import pytest_timeout"*) exit 0 ;;
  "bench/gpu_call.py summary"*) exec "$REAL_PYTHON" "$@" ;;
esac
key=c
case "$1" in
  -m) key=$2 ;;
  bench/*.py) key=$(basename "$1" .py) ;;
esac
if [ "$key" = bench_logprobs ]; then
  case "$*" in *"--section linear"*) key=bench_linear_logprobs ;; esac
fi
echo "${EPOCHREALTIME/,/.} $key $*" >> "$STUB_LOG"
n=$(wc -l < "$STUB_LOG")
out= junit=
prev=
for a in "$@"; do
  case "$prev" in --out) out=$a ;; esac
  case "$a" in --junitxml=*) junit=${a#--junitxml=} ;; esac
  prev=$a
done
if [ "$key" = gpu_call ]; then
  printf '{"device": {"name": "NVIDIA H200 (stub)"}, "versions": {"torch": "2.11.0"}, "date": "stub"}' > "$out/env.json"
  : > "$out/skip_configs.jsonl"
elif [ -n "$out" ]; then
  printf '{"targets": [{"id": "stub.%s", "issue": "stub", "target": "%s ran", "where": "-", "value": 1.0, "need": ">= 1", "ok": true}]}'     "$key" "$key" > "$out/${key}_${n}.json"
fi
if [ -n "$junit" ]; then
  printf '<testsuites><testsuite name="pytest" tests="2"><testcase classname="t" name="a"/><testcase classname="t" name="b"/></testsuite></testsuites>' > "$junit"
fi
sleep_var=STUB_SLEEP_$key
secs=${!sleep_var:-${STUB_SLEEP:-}}
if [ -n "$secs" ]; then exec sleep "$secs"; fi
echo "stub ran: $*"
"""


def _sandbox(tmp_path: Path, **env_extra) -> tuple[Path, dict]:
    if shutil.which("timeout") is None or shutil.which("tar") is None:
        pytest.skip("needs coreutils timeout and tar")
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    for f in FILES:
        shutil.copy(ROOT / f, repo / f)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("python3", PYTHON3_STUB),
                       ("nvidia-smi", "#!/usr/bin/env bash\necho 'name, driver_version'\necho 'NVIDIA H200 (stub), 0'\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HK_RUN_GPU_", "HYDRA_KERNELS_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path / "tmp"),
               STUB_LOG=str(tmp_path / "python3.log"), REAL_PYTHON=sys.executable, **env_extra)
    return repo, env


def _run(repo: Path, env: dict, stage: str | None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The stage in its own process group, killed on a time-out (`timeout` makes a group of its own: the stubs
    then end by themselves, STUB_SLEEP being short)."""
    argv = ["bash", str(repo / "bench" / "run_gpu.sh")] + ([stage] if stage else [])
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _member(out_dir: Path, stage: str, name: str) -> str:
    (tgz,) = out_dir.glob(f"gpu_{stage}_*.tgz")
    with tarfile.open(tgz) as tar:
        return tar.extractfile(f"./{name}").read().decode()


def _names(out_dir: Path, stage: str) -> set[str]:
    (tgz,) = out_dir.glob(f"gpu_{stage}_*.tgz")
    with tarfile.open(tgz) as tar:
        return {m.name.removeprefix("./") for m in tar.getmembers()}


def _status(out_dir: Path, stage: str) -> list[str]:
    return _member(out_dir, stage, "status.txt").split("\n")[:-1]


def _steps(out_dir: Path, stage: str) -> dict:
    """steps.tsv: name -> (status, start s, wall s, limit s, note)."""
    rows = [line.split("\t") for line in _member(out_dir, stage, "steps.tsv").splitlines()]
    return {r[0]: (r[1], float(r[2]), float(r[3]), float(r[4]), r[5]) for r in rows}


def _started(log: Path) -> list[tuple[float, str, str]]:
    """(time, step key, args) of every stub python3 call but the summary's."""
    return [(float(t), k, a) for t, k, a in (line.split(" ", 2) for line in log.read_text().splitlines())]


def test_syntax():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_runs_its_steps_and_packs_them(tmp_path, stage):
    repo, env = _sandbox(tmp_path)
    res = _run(repo, env, stage)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _status(tmp_path / "out", stage) == [n if " " in n else f"{n} rc=0" for n in STAGES[stage]]
    assert f"################ summary ({stage})" in res.stdout


def test_unknown_stage_is_refused(tmp_path):
    repo, env = _sandbox(tmp_path)
    res = _run(repo, env, "nope")
    assert res.returncode == 2 and "unknown stage nope" in res.stdout


def test_steps_are_cut_to_the_stage_deadline(tmp_path):
    """Steps that would run for their nominal limits (tests: 240 + 330 + 120 s, over the 600 s a device call gets)
    end by END: the first is interrupted at END - KILL_AFTER, the others are skipped, and the results are packed."""
    end, kill_after = 8, 1
    repo, env = _sandbox(tmp_path, HK_RUN_GPU_END=str(end), HK_RUN_GPU_KILL_AFTER=str(kill_after), STUB_SLEEP="30")
    t0 = time.monotonic()
    res = _run(repo, env, "tests")
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    assert elapsed < end + 3, elapsed
    assert _status(tmp_path / "out", "tests") == ["cuda_build rc=124", "gpu_tests skipped (no time left)",
                                                  "demo_gpu skipped (no time left)"]


# ------------------------------------------------------------------------------------------------ stage one
KEYS = {"prepare": "gpu_call", "cuda_build": "c", "tests_triton": "pytest", "tests_cuda": "pytest",
        "lora": "bench_lora_linear", "logprobs": "bench_logprobs", "linear_logprobs": "bench_linear_logprobs",
        "ppo": "bench_ppo_variants", "sweep_lora": "bench_lora_linear", "sweep_logprobs": "bench_logprobs",
        "tune_cuda_lora": "tune_cuda_lora"}


def test_one_is_the_default_its_steps_run_in_order_and_the_table_comes_last(tmp_path):
    repo, env = _sandbox(tmp_path)
    res = _run(repo, env, None)
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out"
    assert _status(out, "one") == [n if " " in n else f"{n} rc=0" for n in STAGES["one"]]
    calls = _started(tmp_path / "python3.log")
    assert [k for _, k, _ in calls] == [KEYS[n] for n in ONE_STARTED]
    build, triton_tests = calls[1], calls[2]
    assert "kernels.cuda" in build[2] and "tests/kernels/test_triton_lora_linear.py" in triton_tests[2]
    assert "--junitxml=" in triton_tests[2] and "tests/kernels/test_cuda_parity.py" not in triton_tests[2]
    assert "test_cuda_parity.py" in calls[3][2]
    lora, linear, ppo = calls[4][2], calls[6][2], calls[7][2]
    assert "--case-rows actor_fwd_bwd=2048,8192" in lora and "--case-rows base_actor=16,64" in lora
    assert "--ranks 64" in lora and "--shapes 4096x4096" in lora
    assert "3584x152064" in linear and "eager" in linear and "compile" in linear and "liger" in linear
    assert "--model llama-1b" in ppo and "--variants lora hydra" in ppo
    budget = float(ppo.split("--budget ")[1].split()[0])
    row_timeout = float(ppo.split("--row-timeout ")[1].split()[0])
    assert 130 <= budget <= 140 and row_timeout == pytest.approx(0.6 * budget, abs=0.01)
    # every results file of every step is in the tarball, and the summary reads their targets
    names = _names(out, "one")
    assert {"env.json", "steps.tsv", "summary.json", "summary.md", "tests_triton.xml", "tests_cuda.xml"} <= names
    assert (out / "gpu_one_summary.md").exists() and not list(out.glob("*.part"))
    summary = json.loads(_member(out, "one", "summary.json"))
    verdicts = {v["id"]: v for v in summary["verdicts"]}
    assert verdicts["correctness.triton"]["verdict"] == "MET" and verdicts["correctness.cuda"]["verdict"] == "MET"
    for key in ("bench_lora_linear", "bench_logprobs", "bench_linear_logprobs", "bench_ppo_variants"):
        assert verdicts[f"stub.{key}"]["verdict"] == "MET"
    assert "not built yet" in verdicts["memory.batch_vs_lora"]["why"]
    assert verdicts["lora.fwdbwd_vs_peft"]["verdict"] == "NOT RUN"        # the stub measured no real target
    # the table is the last thing printed
    lines = res.stdout.rstrip("\n").split("\n")
    head = lines.index("| target | source | value | need | verdict |")
    assert lines[head - 1].startswith("results: ") and all(line.startswith("|") for line in lines[head:])
    assert len(lines) - head - 2 == len(summary["verdicts"])
    assert any(line.startswith("| correctness") or "GPU tests of the Triton kernels" in line for line in lines[head:])


def test_one_runs_the_grpo_and_memory_scripts_once_they_exist(tmp_path):
    repo, env = _sandbox(tmp_path)
    for slot in ("grpo", "memory"):
        (repo / "bench" / f"bench_{slot}.py").write_text("")
    res = _run(repo, env, None)
    assert res.returncode == 0, res.stdout + res.stderr
    steps = _steps(tmp_path / "out", "one")
    assert steps["grpo"][0] == "rc=0" and steps["memory"][0] == "rc=0"
    calls = {k: a for _, k, a in _started(tmp_path / "python3.log")}
    for slot in ("grpo", "memory"):
        args = calls[f"bench_{slot}"]
        assert "--out " in args and float(args.split("--budget ")[1].split()[0]) > 0


def test_one_gives_each_step_its_share_and_ends_by_the_deadline(tmp_path):
    """Every step would run a minute (at 2% of the nominal times: 50 minutes): each is stopped at its own share
    (shorter when less is left), later ones are skipped, and the call ends by its 540 s (here 10.8 s)."""
    scale = 2
    repo, env = _sandbox(tmp_path, HK_RUN_GPU_TIME_SCALE=str(scale), STUB_SLEEP="60", STUB_SLEEP_c="0")
    t0 = time.monotonic()
    res = _run(repo, env, None, timeout=60)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    end, kill = 540 * scale / 100, 15 * scale / 100
    assert elapsed < end + 2.0, elapsed
    steps = _steps(tmp_path / "out", "one")
    ran = [n for n in ONE if n in steps and steps[n][0] != "skipped"]
    assert ran[:4] == ["prepare", "tests_triton", "cuda_build", "tests_cuda"] and "lora" in ran
    assert steps["cuda_build"][0] == "rc=0"                                    # the one quick step
    for name in ran:
        status, start, wall, limit, _ = steps[name]
        assert status == "rc=124" or name == "cuda_build", (name, status)    # stopped by its limit
        assert limit <= SHARES[name] * scale / 100 + 1e-3, (name, limit)       # its own share at most
        assert start + limit <= end - kill + 0.05, (name, start, limit)        # and no more than what was left
        assert wall <= limit + kill + 0.5, (name, wall, limit)
    assert steps["prepare"][3] == pytest.approx(SHARES["prepare"] * scale / 100, abs=1e-3)
    assert steps["tests_triton"][3] == pytest.approx(SHARES["tests_triton"] * scale / 100, abs=1e-3)
    skipped = [n for n in ONE if steps.get(n, ("skipped",))[0] == "skipped" and n not in ("grpo", "memory")]
    assert skipped and skipped == ONE[ONE.index(skipped[0]):][: len(skipped)]  # the tail of the order
    assert all(steps[n][4] == "no time left" for n in skipped)
    assert res.stdout.rstrip("\n").split("\n")[-1].startswith("| ")        # the table still comes last


def test_one_keeps_earlier_results_when_a_later_step_overruns_and_the_call_is_killed(tmp_path):
    """The device tool kills the whole call at its limit: what the steps before measured is already in $OUT."""
    repo, env = _sandbox(tmp_path, STUB_SLEEP_bench_ppo_variants="60")
    log = tmp_path / "python3.log"
    proc = subprocess.Popen(["bash", str(repo / "bench" / "run_gpu.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (log.exists() and " bench_ppo_variants " in log.read_text()):
            time.sleep(0.2)
        assert " bench_ppo_variants " in log.read_text()
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)                      # the whole call, at once, as at the 600 s limit
        proc.communicate()
    out = tmp_path / "out"
    assert _status(out, "one") == [f"{n} rc=0" for n in ONE[: ONE.index("ppo")]]
    names = _names(out, "one")
    assert any(n.startswith("bench_lora_linear_") for n in names)
    assert any(n.startswith("bench_linear_logprobs_") for n in names)
    summary = (out / "gpu_one_summary.md").read_text()
    assert "stub.bench_linear_logprobs" in summary and "| ppo |" not in summary


def test_the_correctness_lists_name_collected_tests():
    """Every node id in bench/gpu_tests.txt exists (a renamed test would otherwise silently drop out of the
    GPU call), and the groups are the two the script runs."""
    lines = [line.split() for line in (ROOT / "bench" / "gpu_tests.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert {g for g, _ in lines} == {"triton", "cuda"} and all(len(x) == 2 for x in lines)
    ids = [i for _, i in lines]
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    collected = [line for line in res.stdout.splitlines() if "::" in line]
    for i in ids:
        assert any(c == i or c.startswith(i + "::") or c.startswith(i + "[") for c in collected), i


def test_one_skips_the_cuda_tests_when_the_extension_does_not_build(tmp_path):
    repo, env = _sandbox(tmp_path, HK_RUN_GPU_TIME_SCALE="1", STUB_SLEEP_c="60")
    res = _run(repo, env, None, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    steps = _steps(tmp_path / "out", "one")
    assert steps["cuda_build"][0] == "rc=124" and steps["tests_triton"][0] == "rc=0"
    assert steps["tests_cuda"][0] == "skipped" and "cuda_build did not succeed (124)" in steps["tests_cuda"][4]
    assert steps["cuda_build"][3] == pytest.approx(SHARES["cuda_build"] / 100, abs=1e-3)
    assert steps["lora"][0] == "rc=0"                                          # the call goes on
