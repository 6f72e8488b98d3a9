"""`hydra-rlhf`: the command line.

    hydra-rlhf --version
    hydra-rlhf demo [--out DIR] [--quick] [--seed N] [--algo ppo|grpo] [--no-progress] [key=value ...]
                                                                       Hydra-RLHF end to end on a synthetic task
    hydra-rlhf sft  [--config FILE] [--no-progress] [key=value ...]    Hydra-SFT on your data and local model
    hydra-rlhf ppo  [--config FILE] [--reward-fn MOD:FN ...] [--merge-to DIR] [--export-peft DIR] [--samples N]
                    [--no-progress] [key=value ...]                    PPO on a Hydra-SFT result, or on a plain
                                                                       causal LM with --reward-fn
    hydra-rlhf grpo [--config FILE] [--reward-fn MOD:FN ...] [--merge-to DIR] [--no-progress] [estimator=dapo]
                    [key=value ...]                                    critic-free RL (GRPO, DAPO, RLOO, ...)
    hydra-rlhf selfcheck                                               ops against the float64 reference
    hydra-rlhf bench NAME [options]                                    a benchmark of bench/ (source checkout):
                                                                       lora, logprobs, linear-logprobs, ppo,
                                                                       decode, tune-cuda-lora, grpo (NAME --help)

Configs are JSON or YAML; `key=value` pairs override any setting, dotted into sections (`lora.r=8 run.seed=3
data.sft_path=train.jsonl`); `hydra-rlhf COMMAND --help` lists them all with their defaults. Results go to
run.output_dir (default runs/hydra-sft, runs/hydra-ppo, runs/hydra-grpo). `--no-progress` turns the progress bars
off on every command that shows them (run.progress=false). Settings and data errors print one line and exit 2;
Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys


def _selfcheck(args) -> int:
    """Check every public op's CPU path against the float64 reference on random data (values, and gradients where
    the op has its own backward), and time it. Exit status 1 if any relative error exceeds 1e-5."""
    import time

    import torch

    from hydra_kernels import ops, reference

    def rel(out, ref) -> float:
        out, ref = out.double(), ref.double()
        return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    def grads(fn, *inputs):
        inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
        outs = [o for o in fn(*inputs) if o is not None]
        sum(o.sum() for o in outs).backward()
        return outs, [t.grad for t in inputs]

    ok = True

    def report(name: str, what: str, pairs, fn) -> None:
        nonlocal ok
        err = max(rel(out, ref) for out, ref in pairs)
        fn()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        ms = (time.perf_counter() - t0) / 20 * 1e3
        ok &= err < 1e-5
        print(f"{name:16s} {what}: rel err {err:.2e}, {ms:.3f} ms (cpu, torch backend){'' if err < 1e-5 else '  FAIL'}",
              file=args.stdout)

    torch.manual_seed(0)
    x, w, b = torch.randn(3 * 64, 256), torch.randn(384, 256) / 16, torch.randn(384)
    A, B = torch.randn(2, 16, 256) / 16, torch.randn(2, 384, 16) / 4
    layout = (-1, 0, 1)
    y = ops.lora_linear(x, w, b, A, B, 2.0, layout)
    ref = reference.lora_linear(x.double(), w.double(), b.double(), A.double(), B.double(), [2.0, 2.0], layout)
    report("lora_linear", "3 streams x 64 rows, 256->384, r=16", [(y, ref)],
           lambda: ops.lora_linear(x, w, b, A, B, 2.0, layout))

    V, D, tau = 512, 64, 0.7
    logits, ref_logits = torch.randn(4, 32, V), torch.randn(4, 32, V)
    targets = torch.randint(0, V, (4, 32))
    targets[:, :5] = -100                                        # prompt / padding tokens
    (lp,), (g,) = grads(lambda lo: (ops.token_logprobs(lo, targets, temperature=tau),), logits)
    (lp_r,), (g_r,) = grads(lambda lo: (reference.token_logprobs(lo, targets, temperature=tau),), logits.double())
    report("token_logprobs", f"4x32 tokens, vocab {V}, T={tau} (+grad)", [(lp, lp_r), (g, g_r)],
           lambda: ops.token_logprobs(logits, targets, temperature=tau))
    outs, (g,) = grads(lambda lo: ops.logprobs_and_kl(lo, ref_logits, targets, temperature=tau, kl="k3"), logits)
    outs_r, (g_r,) = grads(lambda lo: reference.logprobs_and_kl(lo, ref_logits.double(), targets, temperature=tau,
                                                                kl="k3"), logits.double())
    report("logprobs_and_kl", f"4x32 tokens, vocab {V}, k3 (+grad)", list(zip(outs, outs_r)) + [(g, g_r)],
           lambda: ops.logprobs_and_kl(logits, ref_logits, targets, temperature=tau, kl="k3"))
    hidden, head = torch.randn(2, 128, D), torch.randn(V, D) / 8
    flat = targets.reshape(-1)
    outs, gs = grads(lambda h, wt: ops.linear_logprobs(h, wt, flat, temperature=tau, kl="k3"), hidden, head)
    outs_r, gs_r = grads(lambda h, wt: reference.linear_logprobs(h, wt, flat, temperature=tau, kl="k3"),
                         hidden.double(), head.double())
    report("linear_logprobs", f"2 streams x 128 tokens, {D}->{V} head, k3 (+grad)",
           list(zip(outs, outs_r)) + list(zip(gs, gs_r)),
           lambda: ops.linear_logprobs(hidden, head, flat, temperature=tau, kl="k3"))
    return 0 if ok else 1


def _demo(args) -> int:
    from hydra_kernels.rlhf.demo.run import apply_demo_overrides, default_config, quick_config, run_demo

    import dataclasses

    algo = args.algo or "ppo"
    cfg = quick_config(algo) if args.quick else default_config(algo)
    if args.out is not None:        # as typed: as a key=value pair, YAML would read "runs/demo #2" as runs/demo
        cfg = dataclasses.replace(cfg, out=args.out)
    pairs = [f"seed={args.seed}"] if args.seed is not None else []
    cfg = apply_demo_overrides(cfg, pairs + list(args.overrides))
    run_demo(cfg, progress=not args.no_progress, stream=args.stdout)
    return 0


def _require(value, name: str, what: str) -> str:
    if not value:
        raise ValueError(f"{name}: {what} is required (set it in the config file or as {name}=...)")
    return value


def _progress_overrides(args, overrides) -> list[str]:
    """The key=value pairs with --no-progress applied (it wins over run.progress given as a pair)."""
    return list(overrides) + (["run.progress=false"] if args.no_progress else [])


def _sft(args) -> int:
    from hydra_kernels import rlhf
    from hydra_kernels.rlhf.data import load_preference_data, load_sft_data

    cfg = rlhf.load_config(rlhf.SFTConfig, args.config, _progress_overrides(args, args.overrides))
    args.run_cfg = cfg.run
    _require(cfg.model.path, "model.path", "a local model directory")
    if not cfg.data.sft_path and not cfg.data.preference_path:
        raise ValueError("data.sft_path: give demonstrations (data.sft_path) and/or pairs (data.preference_path)")
    model, tok = rlhf.load_model_and_tokenizer(cfg.model)
    rlhf.add_pad_token(tok, model)        # a tokenizer without a distinct pad token gets one (embeddings resized)
    # Any file kind or dataset directory of TRL's formats; conversational rows are rendered with tok's chat template.
    demos = load_sft_data(cfg.data.sft_path, tok) if cfg.data.sft_path else []
    pairs = load_preference_data(cfg.data.preference_path, tok) if cfg.data.preference_path else []
    result = rlhf.hydra_sft(model, tok, demos, pairs, cfg)
    from hydra_kernels.rlhf.distributed import is_main
    if is_main():
        print(json.dumps({"output_dir": str(result.output_dir), **result.metrics}, indent=2), file=args.stdout)
    return 0


def _reward_overrides(args) -> list[str]:
    """The user's overrides, with reward_source=function first when --reward-fn is given and reward_source=model
    when reward_model is (in the overrides or the --config file) and reward_source is not; an explicit
    reward_source that contradicts --reward-fn is refused."""
    from hydra_kernels.rlhf.config import parse_overrides, read_config_file

    overrides = list(args.overrides)
    given = parse_overrides(overrides)
    file = read_config_file(args.config) if args.config else {}
    explicit = given.get("reward_source", file.get("reward_source"))
    if args.reward_fn:
        # --reward-fn selects the functions (as python/hydra_ppo.py does); an explicit contradiction is refused.
        if explicit not in (None, "function"):
            raise ValueError(f"reward_source: {explicit!r} contradicts --reward-fn (which uses the function); "
                             f"drop one of them")
        return ["reward_source=function", *overrides]
    if given.get("reward_model", file.get("reward_model")) is not None and explicit is None:
        return ["reward_source=model", *overrides]
    return overrides


def _reward_fns(args, cfg) -> list:
    """The --reward-fn functions, loaded; checked against reward_source and reward_weights before any model."""
    from hydra_kernels.rlhf.rewards import load_reward_fn

    fns = [load_reward_fn(spec, name="--reward-fn") for spec in args.reward_fn or ()]
    if cfg.reward_source == "function" and not fns:
        raise ValueError("reward_source: 'function' needs --reward-fn module:function")
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(fns):
        raise ValueError(f"reward_weights: {len(cfg.reward_weights)} weights for {len(fns)} --reward-fn functions")
    return fns


def _ppo(args) -> int:
    from hydra_kernels import rlhf
    from hydra_kernels.rlhf.data import check_source, load_prompt_data
    from hydra_kernels.rlhf.rewards import check_reward_head_trained
    from hydra_kernels.rlhf.sft import read_reward_head_trained

    if args.samples < 0:
        raise ValueError(f"--samples: must be >= 0, got {args.samples}")
    cfg = rlhf.load_config(rlhf.PPOConfig, args.config, _progress_overrides(args, _reward_overrides(args)))
    args.run_cfg = cfg.run
    if args.merge_to:
        from hydra_kernels.integrations.checkpoint import MERGE_FOREIGN, check_replaceable
        check_replaceable(args.merge_to, name="--merge-to", marker="config.json", foreign=MERGE_FOREIGN)
    if args.export_peft:
        from hydra_kernels.rlhf.models import SHARED_VARIANTS
        if cfg.variant not in SHARED_VARIANTS:
            raise ValueError(f"--export-peft: variant {cfg.variant!r} has no actor adapter on a shared base "
                             f"(only {' and '.join(SHARED_VARIANTS)})")
        from hydra_kernels.integrations.checkpoint import check_replaceable
        from hydra_kernels.integrations.peft_lora import PEFT_CONFIG_NAME, PEFT_FOREIGN
        check_replaceable(args.export_peft, name="--export-peft", marker=PEFT_CONFIG_NAME, foreign=PEFT_FOREIGN)
    path = _require(cfg.model.path, "model.path", "a Hydra-SFT output directory (<sft output_dir>/final), or a "
                                                  "plain model directory with --reward-fn")
    prompt_path = _require(cfg.data.prompt_path, "data.prompt_path", "a file or dataset directory of {prompt} rows")
    check_source(prompt_path)           # read below, with the tokenizer; a missing path is reported first
    reward_fn = _reward_fns(args, cfg) or None
    import os

    import torch

    from hydra_kernels.rlhf.models import load_causal_lm, load_tokenizer
    if not os.path.isdir(path):
        raise ValueError(f"model.path: no such directory: {path!r}")
    from_sft = os.path.isfile(os.path.join(path, "sft.json"))
    if not from_sft and cfg.reward_source == "head":
        raise ValueError(f"model.path: {path!r} is not a Hydra-SFT output (no sft.json), so it has no reward head "
                         f"(reward_source=head): give the final/ directory that `hydra-rlhf sft` wrote under its "
                         f"run.output_dir, or train this model on a reward function with --reward-fn")
    head_trained = not from_sft or read_reward_head_trained(path)
    check_reward_head_trained(cfg.reward_source, head_trained, cfg.allow_untrained_reward_head)   # before loading
    tok = load_tokenizer(cfg.model.tokenizer_path or path,
                         "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path",
                         trust_remote_code=cfg.model.trust_remote_code)
    # After the tokenizer (conversational prompts are rendered with its chat template), before the model.
    # .records holds each row's other columns, for reward functions that take them.
    prompts = load_prompt_data(prompt_path, tok).prompts
    if from_sft:
        model, head = rlhf.load_sft(path, dtype=getattr(torch, cfg.model.dtype),
                                    trust_remote_code=cfg.model.trust_remote_code)
    else:
        # A plain causal LM: train_ppo starts the value head from a fresh head (and says so).
        model, head = load_causal_lm(path, name="model.path", dtype=getattr(torch, cfg.model.dtype),
                                     trust_remote_code=cfg.model.trust_remote_code), None
        rlhf.add_pad_token(tok, model)
    result = rlhf.train_ppo(model, head, tok, prompts, cfg, reward_fn=reward_fn,
                            reward_head_trained=head_trained)
    from hydra_kernels.rlhf.distributed import is_main
    info = {"output_dir": str(result.output_dir), "steps": len(result.history), **result.counters}
    # Files and output once, from rank 0 (a failure there fails every rank).
    if args.merge_to:
        info["merged_policy"] = str(_once(result.models, result.models.export_policy, args.merge_to, tok))
    if args.export_peft:
        result.models.hydra.tokenizer = tok
        info["peft_adapter"] = str(_once(result.models, result.models.hydra.export_peft, "actor", args.export_peft))
    last = result.history[-1] if result.history else {}
    info.update({k: last.get(k) for k in ("objective/scores", "objective/kl", "objective/rlhf_reward")})
    if args.samples:
        info["samples"] = _once(result.models, _samples, result.models, tok, prompts[:args.samples], cfg)
    if is_main():
        print(json.dumps(info, indent=2), file=args.stdout)
    return 0


def _once(models, fn, *args):
    """fn(*args) once: on rank 0, its outcome on every rank; for models FSDP2 shards (run.parallel=fsdp2), on
    every rank, since fn then gathers the weights (collective) and rank 0 alone writes (integrations.fsdp)."""
    from hydra_kernels.integrations.fsdp import any_sharded
    from hydra_kernels.rlhf.distributed import on_rank0
    if any(any_sharded(m) for m in models.shardable()):
        return fn(*args)
    return on_rank0(fn, *args)


def _samples(models, tok, prompts, cfg) -> list[dict]:
    """Greedy completions of `prompts` by the reference (the SFT model) and the trained policy, printed on
    stderr as a few readable lines and returned as [{"prompt", "reference", "policy"}]."""
    from hydra_kernels import rlhf
    from hydra_kernels.rlhf.distributed import is_main
    kw = dict(temperature=0, max_new_tokens=cfg.max_new_tokens, seed=cfg.run.seed,
              max_prompt_len=cfg.data.max_prompt_len)
    ref, _ = rlhf.sample_completions(models, tok, prompts, policy="reference", **kw)
    pol, _ = rlhf.sample_completions(models, tok, prompts, policy="actor", **kw)
    out = [{"prompt": p, "reference": r, "policy": a} for p, r, a in zip(prompts, ref, pol)]
    lines = [f"sample completions (greedy, the first {len(out)} prompts):"]
    for s in out:
        lines += [f"  prompt:    {s['prompt']!r}", f"  reference: {s['reference']!r}", f"  policy:    {s['policy']!r}"]
    if is_main():                        # under FSDP2 every rank samples (collective); one prints
        print("\n".join(lines), file=sys.stderr, flush=True)
    return out


def _grpo(args) -> int:
    import os

    import torch

    from hydra_kernels import rlhf
    from hydra_kernels.rlhf.data import check_source, load_prompt_data
    from hydra_kernels.rlhf.grpo import reward_source
    from hydra_kernels.rlhf.models import load_tokenizer
    from hydra_kernels.rlhf.sft import read_reward_head_trained

    cfg = rlhf.load_config(rlhf.GRPOConfig, args.config, _progress_overrides(args, _reward_overrides(args)))
    args.run_cfg = cfg.run
    if args.merge_to:
        from hydra_kernels.integrations.checkpoint import MERGE_FOREIGN, check_replaceable
        check_replaceable(args.merge_to, name="--merge-to", marker="config.json", foreign=MERGE_FOREIGN)
    path = _require(cfg.model.path, "model.path", "a Hydra-SFT output directory or a causal LM directory")
    prompt_path = _require(cfg.data.prompt_path, "data.prompt_path", "a file or dataset directory of {prompt} rows")
    check_source(prompt_path)
    fns = _reward_fns(args, cfg)
    if not os.path.isdir(path):
        raise ValueError(f"model.path: no such directory: {path!r}")
    dtype = getattr(torch, cfg.model.dtype)
    if os.path.isfile(os.path.join(path, "sft.json")):          # a Hydra-SFT result: its reward head may serve
        tok = load_tokenizer(cfg.model.tokenizer_path or path,
                             "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path",
                             trust_remote_code=cfg.model.trust_remote_code)
        model, head = rlhf.load_sft(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    else:
        head = None
        reward_source(cfg, fns, head)       # a plain model has no reward head: refuse before loading it
        model, tok = rlhf.load_model_and_tokenizer(cfg.model)
        rlhf.add_pad_token(tok, model)
    # Rows, not only the prompt strings: their other columns reach TRL-style reward functions as kwargs.
    prompts = load_prompt_data(prompt_path, tok).records
    result = rlhf.train_grpo(model, tok, prompts, cfg, reward_fn=fns or None, reward_head=head,
                             reward_head_trained=head is None or read_reward_head_trained(path))
    from hydra_kernels.rlhf.distributed import is_main
    info = {"output_dir": str(result.output_dir), "steps": len(result.history), **result.counters}
    if args.merge_to:
        info["merged_policy"] = str(_once(result.models, result.models.export_policy, args.merge_to, tok))
    last = result.history[-1] if result.history else {}
    info.update({k: last.get(k) for k in ("reward", "reward_std", "kl", "completions/mean_length")})
    if is_main():
        print(json.dumps(info, indent=2), file=args.stdout)
    return 0


# `hydra-rlhf bench NAME` -> bench/<script>. The scripts are not part of the installed package: they live next
# to it in a source checkout (pip install -e .), as the GPU stages of bench/run_gpu.sh expect.
BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
BENCHES = {"lora": "bench_lora_linear.py", "logprobs": "bench_logprobs.py",
           "linear-logprobs": "bench_linear_logprobs.py", "ppo": "bench_ppo_variants.py",
           "decode": "bench_decode.py", "tune-cuda-lora": "tune_cuda_lora.py", "grpo": "bench_grpo.py"}


def _bench(args) -> int:
    script = os.path.join(BENCH_DIR, BENCHES[args.name])
    if not os.path.exists(script):
        raise ValueError(f"name: {script} not found: the benchmarks live in bench/ of a source checkout "
                         "(git clone, then pip install -e .)")
    return subprocess.call([sys.executable, script, *args.bench_args])


def _version() -> str:
    """The installed distribution's version, else the package's (a source tree on PYTHONPATH)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("hydra_kernels")
    except PackageNotFoundError:
        import hydra_kernels
        return hydra_kernels.__version__


def _demo_settings() -> str:
    """The demo's own settings (top level, task.*, model.*) as `name=default`, for `demo --help`."""
    import dataclasses

    from hydra_kernels.rlhf.demo.run import DemoConfig

    def rows(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name in ("sft", "ppo"):
                continue
            if dataclasses.is_dataclass(value):
                yield from rows(value, f"{prefix}{f.name}.")
            else:
                yield f"  {prefix}{f.name}={json.dumps(value) if not isinstance(value, str) else value}"
    return "\n".join(["settings (key=value; shown with their defaults, --quick lowers the sizes):",
                      *rows(DemoConfig(), ""),
                      "  sft.*, ppo.*: every setting of `hydra-rlhf sft --help` / `ppo --help`, over the demo's "
                      "own defaults"])


def _add_progress_switch(p: argparse.ArgumentParser) -> None:
    """--no-progress: the one progress switch of every command that shows progress bars."""
    p.add_argument("--no-progress", action="store_true", help="no progress bars (run.progress=false)")


def _reward_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward-fn", action="append", default=None, metavar="MOD:FN",
                   help="a reward function, as module:function or file.py:function: (prompts, completions, ended) "
                        "-> floats, or TRL's f(prompts, completions, **kwargs); repeat it for several, weighted by "
                        "reward_weights=[...]; reward_model=DIR uses a sequence-classification model instead")


def build_parser() -> argparse.ArgumentParser:
    from hydra_kernels.rlhf.config import GRPOConfig, PPOConfig, SFTConfig, settings_help

    parser = argparse.ArgumentParser(prog="hydra-rlhf", description="Hydra-RLHF on fused kernels")
    parser.add_argument("--version", action="version", version=f"hydra-rlhf {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selfcheck", help="check the ops against the float64 reference on CPU")
    p.set_defaults(func=_selfcheck)

    p = sub.add_parser("demo", help="Hydra-SFT + Hydra-PPO end to end on a synthetic arithmetic task (CPU, minutes)",
                       description="Builds a tiny decoder, a char tokenizer and an addition task with a gold reward,\n"
                                   "then runs Hydra-SFT and Hydra-PPO; writes metrics, a PNG plot and a summary.",
                       epilog=_demo_settings(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a reduced run (CI-sized; the numbers are not meaningful)")
    p.add_argument("--seed", type=int, default=None, help="seed for data, model, SFT and PPO (default 0)")
    p.add_argument("--algo", choices=("ppo", "grpo"), default=None,
                   help="the RL stage: ppo (Hydra-PPO on the learned reward, default) or grpo (critic-free RL on the "
                        "task's verifiable reward)")
    _add_progress_switch(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings (below)")
    p.set_defaults(func=_demo)

    # The settings listed under --help come from the config dataclasses, so a new field appears there by itself.
    p = sub.add_parser("sft", help="Hydra-SFT (LM + reward head) on JSONL demonstrations and preference pairs",
                       description="Needs model.path (a local HF model directory) and data.sft_path and/or\n"
                                   "data.preference_path; writes <run.output_dir>/final (load it with `ppo`).",
                       epilog=settings_help(SFTConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="JSON or YAML SFTConfig")
    _add_progress_switch(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings (below); they win over --config")
    p.set_defaults(func=_sft)

    p = sub.add_parser("ppo", help="PPO (variant hydra, j-hydra, lora or full) on a Hydra-SFT result",
                       description="Needs model.path (a Hydra-SFT output directory, i.e. <sft output>/final) and\n"
                                   "data.prompt_path; the reward is the SFT reward head, or your function given\n"
                                   "with --reward-fn (which sets reward_source=function). With --reward-fn,\n"
                                   "model.path may also be a plain causal LM: the value head then starts fresh.",
                       epilog=settings_help(PPOConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="JSON or YAML PPOConfig")
    _add_progress_switch(p)
    p.add_argument("--samples", type=int, default=3, metavar="N",
                   help="at the end, print greedy completions of the first N prompts by the reference and the "
                        "policy (stderr; also in the JSON); 0: none (default 3)")
    _reward_options(p)
    p.add_argument("--merge-to", default=None, metavar="DIR",
                   help="also write the trained policy as a plain HF model directory (lora: the actor adapter "
                        "merged into its copy; hydra / j-hydra: into the base; full: the actor)")
    p.add_argument("--export-peft", default=None, metavar="DIR",
                   help="also write the actor adapter as a PEFT LoRA directory on the SFT model (hydra, j-hydra)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings (below); they win over --config")
    p.set_defaults(func=_ppo)

    p = sub.add_parser("grpo", help="critic-free RL (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++) on one base",
                       description="Needs model.path (a Hydra-SFT output directory, or a causal LM directory) and\n"
                                   "data.prompt_path (JSONL of {prompt, ...}: the other fields reach TRL-style reward\n"
                                   "functions). The reward: --reward-fn (repeatable, weighted by reward_weights),\n"
                                   "reward_model=DIR, or the Hydra-SFT reward head. estimator=dapo etc. selects the\n"
                                   "estimator; the settings left null take its preset, explicit ones win.",
                       epilog=settings_help(GRPOConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="JSON or YAML GRPOConfig")
    _add_progress_switch(p)
    _reward_options(p)
    p.add_argument("--merge-to", default=None, metavar="DIR",
                   help="also write the trained policy (actor merged into the base) as a plain HF model directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings (below); they win over --config")
    p.set_defaults(func=_grpo)

    p = sub.add_parser("bench", help="run a benchmark of bench/ (JSON + Markdown results; CPU smoke mode "
                                     "without a GPU)",
                       description="Runs bench/<script> with the options that follow NAME (see NAME --help). "
                                   f"NAME: {', '.join(BENCHES)}.")
    p.add_argument("name", choices=list(BENCHES))
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...")
    p.set_defaults(func=_bench)
    return parser


def _after_interrupt(args) -> str:
    """What running the same command again does, for the one line printed on Ctrl-C."""
    run = getattr(args, "run_cfg", None)
    if run is None:
        return ""
    from pathlib import Path

    from hydra_kernels.rlhf.checkpoint import latest_checkpoint
    if not run.resume:
        return "; with run.resume=false the same command starts over"
    last = latest_checkpoint(Path(run.output_dir) / "checkpoints")
    if last is None:
        return f"; no checkpoint in {run.output_dir} yet, so the same command starts over"
    return f"; the same command continues from {last}"


def _setting_hint(command: str, stray: list[str], argv: list[str] | None) -> str:
    """For `--steps 3` / `--lora.r=8` where a setting is meant: " (settings are key=value: did you mean steps=3?)"."""
    from hydra_kernels.rlhf.config import GRPOConfig, PPOConfig, SFTConfig, settings

    cls = {"sft": SFTConfig, "ppo": PPOConfig, "grpo": GRPOConfig}.get(command)
    if cls is None:
        return ""
    names = {name.replace(".", "_"): name for name, *_ in settings(cls)}     # --lora-r and --lora.r: lora.r
    argv = list(sys.argv[1:] if argv is None else argv)
    meant = []
    for arg in stray:
        key, eq, value = arg.lstrip("-").partition("=")
        key = names.get(key.replace("-", "_").replace(".", "_"))
        if not arg.startswith("--") or key is None:
            continue
        if not eq:               # `--steps 3`: the value is the next word, unless it is an option or a pair
            i = argv.index(arg) + 1 if arg in argv else len(argv)
            value = argv[i] if i < len(argv) and not argv[i].startswith("-") and "=" not in argv[i] else "..."
        meant.append(f"{key}={value}")
    return f" (settings are key=value: did you mean {' '.join(meant)}?)" if meant else ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value pairs may come on both sides of an option (`... --merge-to DIR steps=2`): argparse gives the
    # positional only the first run of them and leaves the rest over.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}{_setting_hint(args.command, stray, argv)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    hf_bars = None
    if getattr(args, "no_progress", False):
        # transformers draws its own bars (writing and loading weights); --no-progress means none at all
        from transformers.utils import logging as hf_bars
        if hf_bars.is_progress_bar_enabled():
            hf_bars.disable_progress_bar()
        else:
            hf_bars = None
    # stdout carries the command's result (JSON, the demo's table) and nothing else: whatever the libraries print
    # there while it runs (deepspeed's logger, imported by transformers' save_pretrained when installed) goes to
    # stderr.
    args.stdout = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return int(args.func(args) or 0)
    except ValueError as e:
        from hydra_kernels.rlhf.rewards import raised_by_reward_fn
        if raised_by_reward_fn(e):
            raise                    # a bug in the user's reward function: its own traceback, not a settings error
        # Configuration and data errors are the user's to fix: one line, no traceback.
        print(f"hydra-rlhf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: checkpoints and final results are written atomically (temporary directory + rename).
        print(f"hydra-rlhf {args.command}: interrupted{_after_interrupt(args)}", file=sys.stderr)
        return 130
    finally:
        if hf_bars is not None:            # main() may be called in-process: leave the setting as it was
            hf_bars.enable_progress_bar()
        if "hydra_kernels.rlhf.distributed" in sys.modules:      # a run under a launcher: its process group
            sys.modules["hydra_kernels.rlhf.distributed"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
