"""Helpers of the one GPU call (`bash bench/run_gpu.sh`, stage `one`): set-up before the steps, the summary after.

    python bench/gpu_call.py prepare --out W     # W/env.json (device, versions, date) and W/skip_configs.jsonl
    python bench/gpu_call.py summary W           # W/summary.json + W/summary.md; prints the MET / MISSED table

prepare: the launch configs to leave out of Triton autotuning, from the offline sm_90 builds of the installed
Triton version (bench/results/triton_sm90_builds/triton-<version>.jsonl, made by tests/kernels/_triton_sm90.py
--all): a config that did not build, or whose build spills heavily (a stack frame over --max-stack-bytes, 32 by
default). The file it writes is the one hydra_kernels.kernels.triton.skip_listed reads through
$HYDRA_KERNELS_TRITON_SKIP_CONFIGS; without builds for the installed version it writes an empty file (nothing is
left out, and env.json says so).

summary: reads what the steps left in W (steps.tsv, the pytest junit XML files, the benchmarks' JSON) and reports
each target as MET, MISSED or NOT RUN (with the reason). A target's threshold lives in the script that measures it:
every results JSON may carry `targets`, a list of {id, issue, target, where, value, need, ok}; EXPECTED below only
names the targets the call must decide and which step produces each, so that a missing one is reported rather
than silently absent. Pure Python: it runs even where torch does not import.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import pathlib
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILDS = ROOT / "bench" / "results" / "triton_sm90_builds"
MAX_STACK_BYTES = 32

# id -> (issue, what, step that produces it). Thresholds are the measuring scripts' (their `targets`).
EXPECTED = {
    "correctness.triton": ("issue 15", "GPU tests of the Triton kernels and the patched model pass", "tests_triton"),
    "correctness.cuda": ("issue 15", "CUDA parity subset passes", "tests_cuda"),
    "lora.fwdbwd_vs_peft": ("issue 2", "lora_linear fwd+bwd ≥1.3× vs peft-style unfused", "lora"),
    "lora.fwdbwd_vs_base": ("issue 2", "lora_linear fwd+bwd ≤1.10× the base GEMM", "lora"),
    "lora.2stream_vs_separate": ("issue 2", "2 streams (Triton) ≥1.8× vs two passes", "lora"),
    "lora.2stream_hbm": ("issue 2", "2 streams (Triton) ≥75% of HBM on the weight bytes", "lora"),
    "lora.cuda_2stream_vs_separate": ("issue 4", "small-batch 2-stream LoRA (CUDA) ≥1.8× vs two cuBLAS passes",
                                      "lora"),
    "lora.cuda_2stream_hbm": ("issue 4", "small-batch 2-stream LoRA (CUDA) ≥80% of HBM on the weight bytes", "lora"),
    "logprobs.ours_hbm": ("issue 4", "log-prob kernel (Triton) ≥85% of HBM", "logprobs"),
    "logprobs.cuda_hbm": ("issue 4", "log-prob kernel (CUDA) ≥85% of HBM", "logprobs"),
    "linear_logprobs.fwd_tflops": ("issue 3", "linear_logprobs 2 streams forward ≥550 TFLOP/s", "linear_logprobs"),
    "linear_logprobs.fwdbwd_tflops": ("issue 3", "linear_logprobs 2 streams fwd+bwd ≥450 TFLOP/s",
                                      "linear_logprobs"),
    "linear_logprobs.peak_pct": ("issue 3", "linear_logprobs extra peak ≤5% of the fp32 logits", "linear_logprobs"),
    "memory.batch_vs_lora": ("issue 16", "Llama-7B: Hydra-PPO's largest batch in 80 GB ≥5× LoRA-PPO's", "memory"),
    "memory.batch_vs_trl": ("issue 16", "Llama-7B: Hydra-PPO's largest batch in 80 GB ≥3× the TRL-style layout's",
                            "memory"),
    "memory.per_sample_vs_trl": ("issue 16", "Llama-7B: per-sample update bytes ≤0.5× TRL-style's", "memory"),
}
# Steps whose script may not exist yet: the step is skipped with this reason until it does.
NOT_BUILT = {"memory": "bench/bench_memory.py", "grpo": "bench/bench_grpo.py"}


# ================================================================================================ prepare
def _version(name: str):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    """Device, versions, date, commit (what every result of the call is read against)."""
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
           "python": platform.python_version(),
           "versions": {n: _version(n) for n in ("torch", "triton", "transformers", "peft", "liger-kernel",
                                                 "numpy", "pytest", "pytest-xdist", "pytest-timeout")}}
    try:
        import torch
        env["versions"]["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                             "memory_gib": round(p.total_memory / 2 ** 30, 1),
                             "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1) or None}
        else:
            env["device"] = {"name": None, "note": "torch sees no CUDA device"}
    except Exception as e:                                   # reported: the steps will say the same
        env["device"] = {"name": None, "note": f"torch did not import: {type(e).__name__}: {e}"}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        env["commit"] = head.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    env["environment"] = {k: v for k, v in os.environ.items()
                          if k.startswith(("HYDRA_KERNELS_", "TRITON_", "TORCH_", "CUDA_", "HK_RUN_GPU_"))}
    return env


def _autotuned_kernels() -> dict:
    """Build-record name -> (kernel name for skip_listed, config kwarg names, record -> launch facts)."""
    from hydra_kernels.kernels.triton import linear_logprobs as llp
    from hydra_kernels.kernels.triton import lora_linear as tk

    def llp_where(r):
        return {"streams": r["streams"], "fp32": False}          # the builds are bf16 (FP32=False)

    def gemm_where(r):
        return {"dtype": r["dtype"], "r_pad": tk._r_pad(r["rank"])}

    gemm = ("lora_gemm", sorted(tk._GEMM_CONFIGS[0].kwargs), gemm_where)
    return {
        "linear_logprobs_fwd": ("linear_logprobs_fwd", sorted(llp._FWD_CONFIGS[0].kwargs), llp_where),
        "linear_logprobs_dz": ("linear_logprobs_dz", sorted(llp._DZ_CONFIGS[0].kwargs), llp_where),
        "lora_gemm_fwd": gemm, "lora_gemm_dx": gemm,            # one kernel (dx runs it on transposed views)
        "lora_wgrad": ("lora_wgrad", sorted(tk._WGRAD_CONFIGS[0].kwargs), lambda r: {"r_pad": tk._r_pad(r["rank"])}),
    }


def skip_records(builds: list[dict], max_stack_bytes: int = MAX_STACK_BYTES) -> tuple[list[dict], list[dict]]:
    """(records for skip_listed, the builds they come from): every autotuned config that failed to build or whose
    stack frame exceeds max_stack_bytes. Kernels that are not autotuned (logprobs_*) are not listed."""
    kernels = _autotuned_kernels()
    out, why = [], []
    seen = set()
    for b in builds:
        if b.get("name") not in kernels:
            continue
        heavy = not b.get("ok", False) or (b.get("stack") or 0) > max_stack_bytes
        if not heavy:
            continue
        kernel, names, where = kernels[b["name"]]
        rec = {"kernel": kernel, "kwargs": {k: b[k] for k in names if k in b}, "num_warps": b["num_warps"],
               "num_stages": b["num_stages"], "where": where(b)}
        key = json.dumps(rec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(rec)
            why.append({"build": b["name"], "ok": b.get("ok"), "stack": b.get("stack"),
                        "spills": (b.get("spill_st") or 0) + (b.get("spill_ld") or 0), **rec})
    return out, why


def prepare(out_dir: str, skip_file: str | None, builds_dir: str = str(BUILDS),
            max_stack_bytes: int = MAX_STACK_BYTES) -> dict:
    """Write out_dir/env.json and the skip list (default out_dir/skip_configs.jsonl); returns env."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    triton_version = env["versions"].get("triton")
    path = pathlib.Path(builds_dir) / f"triton-{triton_version}.jsonl"
    skip_path = pathlib.Path(skip_file) if skip_file else out / "skip_configs.jsonl"
    info = {"file": str(skip_path), "builds": str(path), "max_stack_bytes": max_stack_bytes}
    if triton_version and path.exists():
        builds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        recs, why = skip_records(builds, max_stack_bytes)
        info.update(builds_read=len(builds), skipped=why)
    else:
        recs = []
        info.update(builds_read=0, skipped=[],
                    note=f"no offline sm_90 builds for triton {triton_version}: every config is autotuned")
    skip_path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    env["skip_configs"] = info
    (out / "env.json").write_text(json.dumps(env, indent=1))
    return env


# ================================================================================================ summary
def read_steps(w: pathlib.Path) -> list[dict]:
    """steps.tsv rows: name, status (rc=N | skipped), start_s, wall_s, limit_s, note."""
    steps = []
    f = w / "steps.tsv"
    if f.exists():
        for line in f.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 5:
                continue
            name, status, start, wall, limit = parts[:5]
            steps.append(dict(name=name, status=status, start_s=_num(start), wall_s=_num(wall),
                              limit_s=_num(limit), note=parts[5] if len(parts) > 5 else ""))
    return steps


def _num(x):
    try:
        return float(x)
    except ValueError:
        return None


def junit_counts(path: pathlib.Path) -> dict | None:
    """{tests, passed, failed, errors, skipped, failures: [names]} from a pytest junit XML, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = dict(tests=0, failed=0, errors=0, skipped=0, failures=[])
    for s in suites:
        for case in s.iter("testcase"):
            c["tests"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("failure") is not None:
                c["failed"] += 1
                c["failures"].append(name)
            elif case.find("error") is not None:
                c["errors"] += 1
                c["failures"].append(name)
            elif case.find("skipped") is not None:
                c["skipped"] += 1
    c["passed"] = c["tests"] - c["failed"] - c["errors"] - c["skipped"]
    return c


def _step_reason(steps: dict, name: str) -> str:
    s = steps.get(name)
    if s is None:
        if name in NOT_BUILT and not (ROOT / NOT_BUILT[name]).exists():
            return f"{NOT_BUILT[name]} not built yet"
        return f"step {name} did not run"
    if s["status"] == "skipped":
        return f"step {name} skipped: {s['note'] or 'no time left'}"
    rc = s["status"].removeprefix("rc=")
    if rc == "124":
        return f"step {name} hit its {s['limit_s']:.0f} s limit before measuring this" if s["limit_s"] else \
            f"step {name} timed out"
    if rc != "0":
        return f"step {name} failed (rc={rc}); see {name}.log"
    return f"step {name} ran but did not measure this"


def correctness_targets(w: pathlib.Path, steps: dict) -> list[dict]:
    out = []
    for tid, step in (("correctness.triton", "tests_triton"), ("correctness.cuda", "tests_cuda")):
        c = junit_counts(w / f"{step}.xml")
        if c is None or c["tests"] == 0:
            continue
        st = steps.get(step, {})
        cut = st.get("status") == "rc=124"
        ok = c["failed"] == 0 and c["errors"] == 0 and not cut
        value = f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped" + \
            (" (cut by the time limit)" if cut else "")
        out.append(dict(id=tid, issue=EXPECTED[tid][0], target=EXPECTED[tid][1], where=step, value=value,
                        need="all pass", ok=ok, failures=c["failures"][:20]))
    return out


def load_results(w: pathlib.Path) -> dict:
    """{kind: [json, ...]} for the benchmarks' results in w (kind from the file name)."""
    kinds = {}
    for f in sorted(w.glob("*.json")):
        if f.name in ("env.json", "summary.json"):
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        kind = f.name.split("_")[0] + ("_" + f.name.split("_")[1] if f.name.startswith(("logprobs_", "ppo_"))
                                       else "")
        data["_file"] = f.name
        kinds.setdefault(kind, []).append(data)
    return kinds


def _direction(need: str) -> int:
    return -1 if str(need).lstrip().startswith("≤") else 1


def verdicts(targets: list[dict], steps: dict) -> list[dict]:
    """One line per target id (EXPECTED's order, then any others): MET if every entry is met, MISSED if one is not,
    NOT RUN (with why) if none was measured. The line shows the first missed entry, else the closest one."""
    by_id = {}
    for t in targets:
        by_id.setdefault(t["id"], []).append(t)
    lines = []
    for tid in list(EXPECTED) + [i for i in by_id if i not in EXPECTED]:
        got = by_id.get(tid, [])
        if tid in EXPECTED:
            issue, what, step = EXPECTED[tid]
        else:
            issue, what, step = got[0].get("issue", "?"), got[0].get("target", tid), None
        if not got:
            lines.append(dict(id=tid, issue=issue, target=what, verdict="NOT RUN", value=None, where=None,
                              need=None, n_met=0, n=0, why=_step_reason(steps, step) if step else "not measured"))
            continue
        missed = [t for t in got if not t["ok"]]
        if missed:
            show = missed[0]
        else:
            numeric = [t for t in got if isinstance(t.get("value"), (int, float))]
            d = _direction(got[0].get("need", ""))
            show = min(numeric, key=lambda t: d * t["value"]) if numeric else got[0]
        lines.append(dict(id=tid, issue=issue, target=what, verdict="MISSED" if missed else "MET",
                          value=show.get("value"), where=show.get("where"), need=show.get("need"),
                          n_met=len(got) - len(missed), n=len(got), why=""))
    return lines


def info_lines(kinds: dict) -> list[str]:
    """The decisive numbers that are not targets: ceilings, PPO step Hydra vs LoRA-PPO, LM-head baselines."""
    out = []
    for res in kinds.get("lora", []):
        c = res.get("ceilings") or {}
        if c.get("hbm_copy_GBps"):
            out.append(f"ceilings: HBM copy {c['hbm_copy_GBps']:.0f} GB/s (read + write), bf16 GEMM "
                       f"{c['bf16_gemm_TFLOPs']:.0f} TFLOP/s ({res['_file']})")
            break
    for res in kinds.get("ppo_variants", []):
        rows = {(r.get("variant"), r.get("activation_checkpointing")): r for r in res.get("rows", [])}
        for ck in (False, True):
            h, lo = rows.get(("hydra", ck)), rows.get(("lora", ck))
            if not h:
                continue
            hl, ll = h.get("last") or {}, (lo or {}).get("last") or {}
            if h.get("status") != "ok":
                out.append(f"PPO step {res['settings']['model']} (ckpt {'on' if ck else 'off'}): Hydra-PPO "
                           f"{h.get('status')}: {str(h.get('error', ''))[:80]}")
                continue
            text = (f"PPO step {res['settings']['model']} {res['settings']['dtype']} (ckpt {'on' if ck else 'off'}): "
                    f"Hydra-PPO peak {_gib(hl.get('peak_step_mib'))} GiB, {_f(hl.get('time_step_s'))} s")
            if lo and lo.get("status") == "ok":
                text += (f"; LoRA-PPO {_gib(ll.get('peak_step_mib'))} GiB, {_f(ll.get('time_step_s'))} s; "
                         f"Hydra/LoRA memory {_f(h.get('memory_vs_lora'))}x, time {_f(h.get('time_vs_lora'))}x")
            elif lo:
                text += f"; LoRA-PPO {lo.get('status')}"
            out.append(text)
    for res in kinds.get("logprobs_linear", []):
        rows = [r for r in res.get("results", []) if r.get("streams") == 2 and r.get("ms")]
        for case in sorted({r["case"] for r in rows}, key=[r["case"] for r in rows].index):
            by = {r["impl"]: r for r in rows if r["case"] == case}
            if "ours" not in by:
                continue
            ours = by["ours"]["ms"]
            vs = ", ".join(f"{i} {by[i]['ms'] / ours:.2f}x" for i in ("eager", "compile", "liger", "chunked")
                           if i in by)
            out.append(f"linear_logprobs {case}: ours {ours:.3f} ms; others' time / ours: {vs or '-'}")
    for kind in ("grpo", "memory"):
        for res in kinds.get(kind, []):
            out.append(f"{kind}: see {res['_file'].removesuffix('.json')}.md")
    return out


def _f(v):
    return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _gib(mib):
    return "-" if mib is None else f"{mib / 1024:.3g}"


def _value(line) -> str:
    v = line["value"]
    if v is None:
        return "-"
    text = f"{v:.3g}" if isinstance(v, float) else str(v)
    if line.get("n", 0) > 1:
        text += f" ({line['where']}; {line['n_met']}/{line['n']} met)"
    elif line.get("where") and not isinstance(v, str):
        text += f" ({line['where']})"
    return text


def summarize(w: pathlib.Path, tarball: str | None = None) -> dict:
    steps_list = read_steps(w)
    steps = {s["name"]: s for s in steps_list}
    env = {}
    if (w / "env.json").exists():
        env = json.loads((w / "env.json").read_text())
    kinds = load_results(w)
    targets = correctness_targets(w, steps)
    for results in kinds.values():
        for res in results:
            for t in res.get("targets") or []:
                if isinstance(t, dict) and "id" in t and "ok" in t:
                    targets.append(dict(t, file=res["_file"]))
    lines = verdicts(targets, steps)
    summary = {"env": env, "steps": steps_list, "targets": targets, "verdicts": lines, "info": info_lines(kinds),
               "tarball": tarball,
               "files": sorted(p.name for p in w.iterdir() if p.is_file())}
    (w / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (w / "summary.md").write_text(markdown(summary))
    return summary


def _head(summary) -> str:
    env = summary["env"]
    dev = (env.get("device") or {}).get("name") or "no GPU"
    v = env.get("versions", {})
    return (f"{dev} · torch {v.get('torch')} (CUDA {v.get('cuda')}) · triton {v.get('triton')} · transformers "
            f"{v.get('transformers')} · {env.get('date')}")


def short_table(summary) -> list[str]:
    lines = ["| target | source | value | need | verdict |", "|---|---|---|---|---|"]
    for v in summary["verdicts"]:
        verdict = v["verdict"] + (f": {v['why']}" if v["why"] else "")
        lines.append(f"| {v['target']} | {v['issue']} | {_value(v)} | {v['need'] or '-'} | {verdict} |")
    return lines


def markdown(summary) -> str:
    out = [f"# The one GPU call — {_head(summary)}", "", f"commit {summary['env'].get('commit')}; results "
           f"{summary.get('tarball') or '(this folder)'}", "", "## Steps", "",
           "| step | status | start s | wall s | limit s | note |", "|---|---|---|---|---|---|"]
    for s in summary["steps"]:
        out.append(f"| {s['name']} | {s['status']} | {_f(s['start_s'])} | {_f(s['wall_s'])} | {_f(s['limit_s'])} | "
                   f"{s['note']} |")
    out += ["", "## Targets", "", *short_table(summary), "", "## Decisive numbers", ""]
    out += [f"- {line}" for line in summary["info"]] or ["- none measured"]
    out += ["", "## Every target entry", "", "| id | issue | where | value | need | met | file |",
            "|---|---|---|---|---|---|---|"]
    for t in summary["targets"]:
        out.append(f"| {t['id']} | {t.get('issue')} | {t.get('where')} | {_f(t.get('value'))} | {t.get('need')} | "
                   f"{'MET' if t['ok'] else 'MISSED'} | {t.get('file', '-')} |")
    skip = (summary["env"].get("skip_configs") or {})
    if skip:
        out += ["", f"Autotuning: {len(skip.get('skipped', []))} configs left out from {skip.get('builds')} "
                    f"({skip.get('builds_read')} builds; stack frame > {skip.get('max_stack_bytes')} B or no build)"
                    + (f"; {skip['note']}" if skip.get("note") else "")]
        for s in skip.get("skipped", []):
            out.append(f"- {s['build']} {s['kwargs']} warps {s['num_warps']} stages {s['num_stages']} {s['where']}: "
                       f"stack {s['stack']} B, {s['spills']} spill instructions" + ("" if s["ok"] else ", no build"))
    return "\n".join(out) + "\n"


def print_table(summary) -> None:
    """The short table, printed last by the call (the device tool returns the end of the output)."""
    def step(s):
        status = "ok" if s["status"] == "rc=0" else s["status"]
        return f"{s['name']} {status}" + ("" if s["wall_s"] is None else f" {s['wall_s']:.0f}s")

    end = max(((s["start_s"] or 0) + (s["wall_s"] or 0) for s in summary["steps"]), default=0)
    print(f"################ the one GPU call: {_head(summary)}")
    print("steps: " + ", ".join(step(s) for s in summary["steps"]) + f"; the last ended at {end:.0f} s")
    for line in summary["info"]:
        print("info: " + line)
    if summary.get("tarball"):
        print(f"results: {summary['tarball']}")
    print("\n".join(short_table(summary)))


# =================================================================================================== main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="env.json and the autotuning skip list")
    p.add_argument("--out", required=True, help="the call's results folder")
    p.add_argument("--skip-file", help="where to write the skip list (default OUT/skip_configs.jsonl)")
    p.add_argument("--builds", default=str(BUILDS), help="folder of triton-<version>.jsonl offline builds")
    p.add_argument("--max-stack-bytes", type=int, default=MAX_STACK_BYTES,
                   help="a build whose stack frame is larger spills heavily and is left out")
    s = sub.add_parser("summary", help="summary.json + summary.md; prints the MET / MISSED table")
    s.add_argument("folder")
    s.add_argument("--tarball", help="where the call's results are packed (named in the summary)")
    s.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        env = prepare(args.out, args.skip_file, args.builds, args.max_stack_bytes)
        sk = env["skip_configs"]
        print(f"device: {env['device'].get('name')}; versions: {json.dumps(env['versions'])}")
        print(f"autotuning: {len(sk['skipped'])} configs left out ({sk['builds_read']} offline builds read from "
              f"{sk['builds']})" + (f"; {sk['note']}" if sk.get("note") else ""))
        for r in sk["skipped"]:
            print(f"  - {r['build']} {r['kwargs']} w{r['num_warps']} s{r['num_stages']} {r['where']}: stack "
                  f"{r['stack']} B")
        return 0
    summary = summarize(pathlib.Path(args.folder), args.tarball)
    if not args.quiet:
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
