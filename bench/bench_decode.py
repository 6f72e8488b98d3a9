"""Benchmark: decoding (model.generate with the KV cache), time per new token, Hydra's patched model vs the
models a user would otherwise sample from.

PPO's rollout phase is autoregressive sampling: a few rows per step through every linear layer, one token at a
time, where the weights' bytes and the host's per-layer overhead (Python, launches) decide the speed rather
than FLOPs. Rows (impl), on one Llama model with random weights built from a config (no download; bf16 on GPU,
fp32 on CPU), all greedy, every row exactly --new-tokens long (EOS is disabled):
  hf           the plain transformers model, no adapters: the floor
  peft         peft LoRA on every linear layer of the decoder (r = --lora-r, alpha = 2 r): what LoRA-PPO samples with
  hydra-actor  the same model patched by hydra_kernels (adapters actor + critic), sampling with the actor stream
  hydra-base   the patched model with LoRA off (Hydra's reference policy)
  rollout-actor  hydra_kernels.rlhf.rollout.generate, the loop PPO samples with (fp32 head, own KV handling),
               actor stream, greedy; rollout-actor-compiled (--compile): the same with compile=True
               (PPOConfig.compile_rollout: static KV cache, torch.compiled step)
  hydra-actor-cuda  (GPU only) hydra-actor with HYDRA_KERNELS_CUDA_AUTO=1: the csrc small-batch LoRA kernel
  hf-static-compiled, hydra-actor-static-compiled  (--compile; default on a GPU) generate with
               cache_implementation="static", which torch.compiles the forward (mode reduce-overhead: CUDA graphs,
               no per-layer host overhead); the first call (timed apart: first_call_s) compiles
Reported: median ms per generated token (the whole batch advances one token) over --reps timed calls after a
warm-up call (Triton compilation and autotuning happen there), tokens/s, and ratios: `x vs peft` = peft's time /
this row's (> 1: faster than peft), `overhead vs hf` = this row's time / hf's. lora_B is zero, as at the start of
PPO, so every row computes the same function: `same tokens as hf` checks that (exactly on CPU in fp32; on a GPU in
bf16 a near-tie may flip a token of random weights, so it is reported, not asserted).

  python bench/bench_decode.py --out bench/results              # GPU: llama-1b, 16 prompts x 128 + 128 tokens
  python bench/bench_decode.py --cpu --quick --out /tmp/d        # CPU smoke run (tiny model)

Writes <out>/decode_<model>_<device>_<date>.json (device, versions, date, settings, raw times) and a .md table,
rewritten after every row (a time limit loses only the row running); the compiling rows run last.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

GPU_DEFAULTS = dict(model="llama-1b", batch_size=16, prompt_len=128, new_tokens=128, lora_r=16, reps=3)
QUICK_DEFAULTS = dict(model="tiny", batch_size=4, prompt_len=16, new_tokens=24, lora_r=8, reps=3)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(generate, device, reps: int):
    """(median seconds of `reps` timed calls after one warm-up call, their times, the warm-up call's output ids,
    the warm-up call's seconds: compilation, autotuning)."""
    _sync(device)
    t0 = time.perf_counter()
    out = generate()
    _sync(device)
    first = time.perf_counter() - t0
    ts = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        generate()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts, out, first


def summarize(rows: list[dict]) -> list[dict]:
    """Rows with the ratios (vs peft, vs hf) and token agreement with hf filled in; the raw ids dropped."""
    rows = [dict(r) for r in rows]
    by = {r["impl"]: r for r in rows}
    hf = by.get("hf", {})
    for r in rows:
        if "ms_per_token" not in r or "ms_per_token" not in hf:
            continue
        if "ms_per_token" in by.get("peft", {}):
            r["x_vs_peft"] = by["peft"]["ms_per_token"] / r["ms_per_token"]
        r["overhead_vs_hf"] = r["ms_per_token"] / hf["ms_per_token"]
        r["same_tokens_as_hf"] = float((r["new_ids"] == hf["new_ids"]).float().mean())
    for r in rows:
        r.pop("new_ids", None)
    return rows


def run(args, save=lambda meta: None) -> dict:
    """Time every row; `save(meta)` is called after each one (a time limit then loses only the running row)."""
    import bench_logprobs as common
    import bench_ppo_variants as ppo_bench
    import hydra_kernels as hk
    from hydra_kernels.integrations.patch import patch_model

    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    P, N, B = args.prompt_len, args.new_tokens, args.batch_size
    model = ppo_bench.build_model(args.model, device, dtype, P + N).eval()
    vocab = ppo_bench.MODELS[args.model]["vocab_size"]
    ids = torch.randint(2, vocab, (B, P), generator=torch.Generator().manual_seed(1)).to(device)
    ids[:, 0] = ppo_bench.BenchTokenizer.bos_token_id
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False, use_cache=True,
              pad_token_id=ppo_bench.BenchTokenizer.pad_token_id, eos_token_id=None)

    compiled_kw = {}
    if args.compile:
        from transformers.generation.configuration_utils import CompileConfig
        config = CompileConfig(fullgraph=True, dynamic=False)
        config._compile_all_devices = True                    # transformers compiles on CUDA only otherwise
        compiled_kw = dict(cache_implementation="static", compile_config=config)

    def generate(m, stream=None, compiled=False):
        extra = compiled_kw if compiled else {}

        def call():
            with torch.no_grad():
                if stream is None:
                    return m.generate(input_ids=ids, **kw, **extra)
                with hk.streams(m, stream):
                    return m.generate(input_ids=ids, **kw, **extra)
        return call

    def rollout(m, compiled):
        from hydra_kernels.rlhf.models import PolicyHandle
        from hydra_kernels.rlhf.rollout import generate as rollout_generate

        def call():
            ro = rollout_generate(PolicyHandle(m, "actor"), ids, mask, max_new_tokens=N, temperature=0.0,
                                  eos_token_id=ppo_bench.BenchTokenizer(vocab).eos_token_id,
                                  pad_token_id=ppo_bench.BenchTokenizer.pad_token_id, compile=compiled)
            return ro.input_ids
        return call

    rows = []
    meta = {"bench": "bench/bench_decode.py", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": common.device_name(device), "device_type": device.type, "dtype": str(dtype).split(".")[-1],
            "versions": common.versions(), "threads": torch.get_num_threads() if not gpu else None,
            "settings": {k: getattr(args, k) for k in ("model", "batch_size", "prompt_len", "new_tokens", "lora_r",
                                                       "reps", "compile")}}

    def record(impl, call, **extra):
        try:
            secs, raw, out, first = time_generate(call, device, args.reps)
        except Exception as e:                                # one failing row must not cost the others
            rows.append(dict(impl=impl, error=f"{type(e).__name__}: {str(e)[:500]}"))
        else:
            rows.append(dict(impl=impl, ms_per_token=secs / N * 1e3, tokens_per_s=B * N / secs,
                             first_call_s=first, raw_s=raw, new_ids=out[:, P:].cpu(), **extra))
        save(dict(meta, results=summarize(rows)))

    # The rows that answer "is Hydra's sampling as fast as peft's" first; compiling ones (minutes each) last.
    record("hf", generate(model))
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        rows.append(dict(impl="peft", error="peft is not installed"))
    else:
        peft_model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                      target_modules=list(TARGETS)))
        record("peft", generate(peft_model))
        model = peft_model.unload()                          # the plain model back, LoRA layers removed
    plain = copy.deepcopy(model) if args.compile else None    # for the compiled HF row, timed last
    patch_model(model, adapters=("actor", "critic"), r=args.lora_r, alpha=2 * args.lora_r)
    record("hydra-actor", generate(model, "actor"))
    record("hydra-base", generate(model, "base"))
    record("rollout-actor", rollout(model, compiled=False))
    if gpu:
        from hydra_kernels.ops.lora_linear import CUDA_AUTO_ENV
        os.environ[CUDA_AUTO_ENV] = "1"
        try:
            record("hydra-actor-cuda", generate(model, "actor"))   # the CUDA kernel has not run on a GPU before
        finally:
            os.environ.pop(CUDA_AUTO_ENV, None)
    if args.compile:
        record("rollout-actor-compiled", rollout(model, compiled=True))
        record("hydra-actor-static-compiled", generate(model, "actor", compiled=True))
        record("hf-static-compiled", generate(plain, compiled=True))

    return dict(meta, results=summarize(rows))


def markdown(meta) -> str:
    import bench_logprobs as common
    s = meta["settings"]
    lines = [f"# bench_decode: {s['model']}, {s['batch_size']} prompts x ({s['prompt_len']} + {s['new_tokens']}) "
             f"tokens, greedy, LoRA r={s['lora_r']}", "",
             f"- device: {meta['device']} ({meta['dtype']}); versions: {json.dumps(meta['versions'])}",
             f"- date (UTC): {meta['date']}; median of {s['reps']} timed generate calls after a warm-up call", "",
             "| impl | ms / token | tokens/s | x vs peft | overhead vs hf | same tokens as hf | first call s |",
             "|---|---|---|---|---|---|---|"]
    for r in meta["results"]:
        if "error" in r:
            lines.append(f"| {r['impl']} | error: {r['error'][:120]} | | | | | |")
            continue
        lines.append(f"| {r['impl']} | {common._fmt(r['ms_per_token'])} | {common._fmt(r['tokens_per_s'])} | "
                     f"{common._fmt(r.get('x_vs_peft'))} | {common._fmt(r['overhead_vs_hf'])} | "
                     f"{common._fmt(r.get('same_tokens_as_hf'))} | {common._fmt(r['first_call_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU exists")
    p.add_argument("--quick", action="store_true", help="the CPU smoke settings (tiny model); default without a GPU")
    p.add_argument("--model", choices=("tiny", "llama-160m", "llama-1b", "llama-7b"))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--threads", type=int, default=1, help="CPU torch threads")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time static-cache compiled generate (default: on a GPU)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    quick = args.quick or args.cpu or not torch.cuda.is_available()
    for k, v in (QUICK_DEFAULTS if quick else GPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.compile is None:
        args.compile = not quick
    for k in ("batch_size", "prompt_len", "new_tokens", "lora_r", "reps"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')}: must be at least 1, got {getattr(args, k)}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')

    def save(meta):
        slug = "".join(c if c.isalnum() else "-" for c in meta["device"].lower()).strip("-")[:40]
        stem = out / f"decode_{args.model}_{slug}_{started}"
        stem.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
        stem.with_suffix(".md").write_text(markdown(meta))

    meta = run(args, save)
    save(meta)
    print(markdown(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
