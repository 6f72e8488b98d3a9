"""Benchmark: one critic-free (GRPO) step on one base, Hydra's scoring vs a separate reference forward.

Rows: implementation x setting, the same estimator (GRPO, k3 KL in the loss, β = 0.04) and the same rollout:
  hydra     rlhf.variants.CriticFree: one no-grad forward of only the streams needed (base for the reference,
            actor for old log-probs) and one fused LM-head sweep (ops.linear_logprobs: no logits stored); the
            update forward fuses the LM head too
  separate  what TRL and verl do with PEFT: the reference log-probs in their own no-grad forward with the
            adapter disabled, the old log-probs in another, each from materialised fp32 logits (log-softmax of
            the [tokens, vocab] logits), and the update from materialised logits as well
Settings: mu1 (num_iterations 1: the reference alone is scored; the old log-probs are the detached current ones)
and mu2 (num_iterations 2: old and reference log-probs are both scored).

A Llama of preset --model is built from a config with random weights (no download; bf16 on GPU, fp32 on CPU),
patched with one LoRA adapter (rank --lora-r, all linear layers). Each row samples one rollout (--batch-size
completions, --num-generations per prompt, --prompt-len prompt tokens, exactly --response-len completion tokens:
the benchmark tokenizer's EOS is outside the vocabulary) and then runs --steps GRPOTrainer steps on that rollout
(the first is warm-up: Triton compilation and autotuning, the optimizer's state); reported from the last:
time of the scoring pass and of the update, and peak memory of the step (GPU: torch.cuda.max_memory_allocated,
reset at the start of the step; CPU: not measured, shown as -), and the loss (both implementations compute the
same estimator: their losses agree to rounding). Ratios: separate / hydra, per setting.

The issue states no numeric target for this comparison, so the JSON's `targets` list is empty (bench/gpu_call.py
reports the file as an info line). `--budget` seconds bound the run: rows not started by then are skipped.

  python bench/bench_grpo.py --quick                          # CPU smoke run (tiny model), seconds
  python bench/bench_grpo.py --out DIR --budget 50            # the GPU call's grpo slot (bench/run_gpu.sh)

Writes <out>/grpo_<model>_<device>_<date>[_<tag>].json (device, versions, date, settings, every number) and a
Markdown table next to it; prints the short table last.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import pathlib
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from bench_ppo_variants import MODELS, BenchTokenizer, MemProbe, build_model, make_prompts  # noqa: E402

MIB = 1 << 20
IMPLS = ("hydra", "separate")
SETTINGS = {"mu1": ["num_iterations=1"], "mu2": ["num_iterations=2"]}
GPU_DEFAULTS = dict(model="llama-1b", batch_size=32, num_generations=8, prompt_len=128, response_len=64, steps=2,
                    lora_r=16)
QUICK_DEFAULTS = dict(model="tiny", batch_size=8, num_generations=4, prompt_len=16, response_len=8, steps=2, lora_r=8)
BETA = 0.04


def bench_reward(prompts, completions, ended):
    """A deterministic reward of the completion's ids (the benchmark times the step, not the learning)."""
    return [float(sum(map(int, c.split())) % 7) for c in completions]


def separate_models(models):
    """`models` (a CriticFree) scoring and updating as TRL / verl do with PEFT: one forward per policy, the
    reference with the adapter off, log-probs from materialised fp32 logits."""
    from hydra_kernels import ops
    from hydra_kernels.integrations import decoder_forward
    from hydra_kernels.rlhf.scoring import IGNORE_INDEX, logits_f32, response_hidden, response_targets
    from hydra_kernels.rlhf.variants import PolicyScores

    def logprobs(rollout, stream, temperature, need_entropy):
        h, _ = decoder_forward(models.model, rollout.input_ids, rollout.attention_mask, rollout.position_ids,
                               (stream,))
        logits = logits_f32(models.model, response_hidden(h[0], rollout))
        targets = response_targets(rollout)
        if need_entropy:
            logp, _, _, ent = ops.logprobs_and_kl(logits, logits.detach(), targets, temperature, "k1", IGNORE_INDEX)
            return logp, ent
        return ops.token_logprobs(logits, targets, temperature, IGNORE_INDEX), None

    @torch.no_grad()
    def score_policies(rollout, *, actor, reference, reward, temperature, kl_estimator=None):
        out, m = PolicyScores(), rollout.response_mask.float()
        if reference:
            out.ref_logprobs = logprobs(rollout, "base", temperature, False)[0] * m
        if actor:
            lp, ent = logprobs(rollout, "actor", temperature, True)
            out.logprobs, out.entropy = lp * m, ent * m
        return out

    def forward(rollout, *, temperature, need_entropy):
        m = rollout.response_mask.float()
        lp, ent = logprobs(rollout, "actor", temperature, need_entropy)
        return lp * m, (None if ent is None else ent * m), None

    models.score_policies, models.forward = score_policies, forward
    return models


def measure_row(impl: str, setting: str, s: dict, device: torch.device, dtype: torch.dtype, out_dir) -> dict:
    from hydra_kernels.rlhf.config import GRPOConfig, load_config
    from hydra_kernels.rlhf.grpo import GRPOTrainer
    from hydra_kernels.rlhf.rewards import build_rewards
    from hydra_kernels.rlhf.variants import build_critic_free

    row = {"impl": impl, "setting": setting, "status": "ok"}
    try:
        torch.manual_seed(0)
        tok = BenchTokenizer(MODELS[s["model"]]["vocab_size"])
        model = build_model(s["model"], device, dtype, s["prompt_len"] + s["response_len"])
        cfg = load_config(GRPOConfig, None, [
            f"batch_size={s['batch_size']}", f"num_generations={s['num_generations']}", f"beta={BETA}",
            f"max_new_tokens={s['response_len']}", f"lora.r={s['lora_r']}", f"lora.alpha={2 * s['lora_r']}",
            f"data.max_prompt_len={s['prompt_len']}", f"run.device={device}", "run.progress=false",
            f"run.output_dir={out_dir}", *SETTINGS[setting]])
        models = build_critic_free(model, None, cfg)
        if impl == "separate":
            separate_models(models)
        prompts = make_prompts(s["batch_size"] // s["num_generations"], s["prompt_len"], tok.vocab_size)
        trainer = GRPOTrainer(models, tok, prompts, cfg, rewards=build_rewards("function", bench_reward))
        t0 = time.perf_counter()
        rollout = trainer.rollout(0)
        row["time_rollout_s"] = time.perf_counter() - t0
        trainer.rollout = lambda step: rollout              # every step on the same completions
        probe = MemProbe(device)
        row["steps"] = []
        for step in range(s["steps"]):
            probe.reset()
            m = trainer.step(step)
            peak = probe.peak()["peak_mib"] if device.type == "cuda" else None
            row["steps"].append({"time_score_s": m["time/score"], "time_update_s": m["time/update"],
                                 "peak_mib": peak, "loss": m["loss"], "kl": m.get("kl"),
                                 "response_length": m["completions/mean_length"]})
        row["last"] = dict(row["steps"][-1], time_step_s=row["steps"][-1]["time_score_s"]
                           + row["steps"][-1]["time_update_s"])
    except Exception as e:                                   # noqa: BLE001 - one failed row never stops the others
        row.update(status="oom" if "out of memory" in str(e).lower() else "error", error=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc()[-3000:])
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """separate / hydra for time (scoring, update, both) and peak memory, per setting (None where a side failed)."""
    by = {(r["impl"], r["setting"]): r for r in rows}
    for r in rows:
        h = by.get(("hydra", r["setting"]))
        ok = r["status"] == "ok" and h is not None and h["status"] == "ok"
        for key in ("time_score_s", "time_update_s", "time_step_s", "peak_mib"):
            a, b = (r["last"].get(key), h["last"].get(key)) if ok else (None, None)
            r[f"{key}_vs_hydra"] = a / b if a is not None and b else None


def _fmt(v, nd=3):
    return "-" if v is None else f"{v:.{nd}g}" if isinstance(v, float) else str(v)


def short_table(result: dict) -> list[str]:
    lines = ["| impl | setting | score s | update s | step s | peak MiB | loss | step time / hydra | memory / hydra |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['impl']} | {r['setting']} | {r['status']}: {r.get('error', '')[:60]} |"
                         + " |" * 6)
            continue
        last = r["last"]
        lines.append(f"| {r['impl']} | {r['setting']} | {_fmt(last['time_score_s'])} | {_fmt(last['time_update_s'])} "
                     f"| {_fmt(last['time_step_s'])} | {_fmt(last['peak_mib'], 5)} | {_fmt(last['loss'], 6)} | "
                     f"{_fmt(r['time_step_s_vs_hydra'])} | {_fmt(r['peak_mib_vs_hydra'])} |")
    return lines


def markdown(result: dict) -> str:
    m, s = result["meta"], result["settings"]
    head = [f"# One GRPO step: Hydra (streams, fused LM head) vs a separate reference forward",
            "", f"{m['device']} · torch {m['versions'].get('torch')} · transformers "
            f"{m['versions'].get('transformers')} · {m['date']} · commit {m.get('commit')}", "",
            f"model {s['model']} ({s['dtype']}), {s['batch_size']} completions ({s['num_generations']} per prompt), "
            f"{s['prompt_len']} + {s['response_len']} tokens, LoRA r={s['lora_r']}, β={BETA} (k3 in the loss); "
            f"last of {s['steps']} steps on one rollout; rollout itself not timed in the ratio.", ""]
    return "\n".join(head + short_table(result) + ["", "No numeric target for this comparison (info rows).", ""])


def write_outputs(result: dict, out_dir: str, tag: str = "") -> tuple[pathlib.Path, pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    day = result["meta"]["date"][:10]
    stem = f"grpo_{result['settings']['model']}_{result['meta']['device_type']}_{day}" + (f"_{tag}" if tag else "")
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    js.write_text(json.dumps(result, indent=1, default=str))
    md.write_text(markdown(result))
    return js, md


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized smoke run (tiny model); default without a GPU")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--model", choices=sorted(MODELS), default=None)
    for name in ("batch_size", "num_generations", "prompt_len", "response_len", "steps", "lora_r"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["mu2", "mu1"],
                   help="mu2 first: the setting where the fused (base, actor) scoring differs most")
    p.add_argument("--budget", type=float, default=None, help="seconds; rows not started by then are skipped")
    p.add_argument("--out", default=None, help="directory for the JSON + Markdown results")
    p.add_argument("--tag", default="", help="suffix of the result files")
    return p


def main(argv=None) -> int:
    import bench_logprobs as common
    from importlib.metadata import version

    args = build_parser().parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        torch.set_num_threads(1)
    quick = args.quick or not gpu
    s = dict(QUICK_DEFAULTS if quick else GPU_DEFAULTS)
    for k in list(s):
        if getattr(args, k, None) is not None:
            s[k] = getattr(args, k)
    if s["batch_size"] % s["num_generations"]:
        raise SystemExit(f"--batch-size {s['batch_size']} must be divisible by --num-generations "
                         f"{s['num_generations']}")
    dtype = torch.bfloat16 if gpu else torch.float32
    s.update(dtype=str(dtype).removeprefix("torch."), quick=quick, beta=BETA, impls=args.impls,
             settings=args.settings)
    versions = common.versions()
    versions["transformers"] = version("transformers")
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device_type": device.type,
            "device": torch.cuda.get_device_name(device) if gpu else "cpu", "versions": versions,
            "commit": _git_commit(), "torch_threads": torch.get_num_threads()}
    t_start, rows = time.perf_counter(), []
    result = {"meta": meta, "settings": s, "rows": rows, "targets": []}

    def save() -> None:
        # After every row: a step killed at its time limit keeps the rows it measured.
        add_ratios(rows)
        result["wall_s"] = time.perf_counter() - t_start
        if args.out:
            js, md = write_outputs(result, args.out, args.tag)
            print(f"wrote {js} and {md}", flush=True)

    import tempfile
    with tempfile.TemporaryDirectory() as work:
        for setting in args.settings:
            for impl in args.impls:
                if args.budget is not None and time.perf_counter() - t_start > args.budget:
                    rows.append({"impl": impl, "setting": setting, "status": "skipped",
                                 "error": f"--budget {args.budget:.0f} s spent"})
                    continue
                rows.append(measure_row(impl, setting, s, device, dtype, work))
                print(f"{impl:9s} {setting}: {rows[-1]['status']} "
                      f"{_fmt(rows[-1].get('last', {}).get('time_step_s'))} s", flush=True)
                save()
    save()
    print("\n".join(short_table(result)))
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


def _git_commit() -> str | None:
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
