"""`hydra-rlhf demo`: Hydra-RLHF end to end on two-number addition, on CPU, in a few minutes.

Stages (each writes under --out):

    data/      the task as JSONL in the loaders' schemas (sft, pref, ppo, eval_prompts, eval_pairs)
    base/      a tiny Llama + char tokenizer, built from a config (optionally pretrained on correct sums),
               saved as a plain HF directory and loaded back with the same loader a user's checkpoint goes through
    sft/       Hydra-SFT: LM head + reward head trained jointly on the imperfect demonstrations and the pairs;
               its result lives in the base weights (LoRA mode merges the adapter), so "LoRA off" = SFT model
    ppo/       Hydra-PPO (variant hydra): one base, actor and critic adapters, learned reward = reward head
               with LoRA off; metrics.jsonl has one line per step with TRL's metric names
    grpo/      with --algo grpo instead: critic-free RL (GRPO by default) on one base with one adapter, the gold
               reward as the verifiable reward; metrics.jsonl with TRL's GRPOTrainer names
    ppo_curves.png / grpo_curves.png   the RL stage's curves
    summary.json     the final numbers (also printed as a table)

With PPO the gold reward is never used for training (GRPO trains on it, as on any verifiable reward); either
way it measures the SFT policy (LoRA off) and the trained policy (actor) on held-out prompts with the same
decoding and the same sampling seed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from hydra_kernels.rlhf.demo.model import TinyModelConfig
from hydra_kernels.rlhf.demo.task import TaskConfig


def _default_sft():
    from hydra_kernels.rlhf.config import SFTConfig
    # Full fine-tuning, as in the paper: at hidden 64 a rank-16 adapter adds half of each linear's FLOPs, and the
    # LoRA run took 1.4x as long per step for a weaker reward head. reward_coef 3: the reward head has the harder
    # job (verifying a sum at the EOS position) and the LM already knows addition from pretraining.
    # 28800 records / 64 x 3 epochs = 1350 steps.
    return SFTConfig(mode="full", epochs=3, batch_size=64, lr=1e-3, warmup_steps=50, reward_coef=3.0,
                     lora={"r": 16, "alpha": 32},
                     data={"max_prompt_len": 16, "max_len": 24, "eval_fraction": 0.0},
                     run={"progress": True, "resume": False})


def _default_ppo():
    from hydra_kernels.rlhf.config import PPOConfig
    # kl_coef 2: Bradley–Terry fixes only reward differences, and after Hydra-SFT the head's scores spread over
    # several units (±5..±15 across prompts), so β must be large in absolute terms for β·KL to matter. With the
    # usual 0.05 the policy drifts to KL ~1 nat and gains little on held-out prompts (numbers: bench/results).
    # vf_coef 0.5 with max_grad_norm 5: the early value loss is large (the value head starts as the reward
    # head) and, clipped jointly at 1.0, it would shrink the policy's updates too.
    return PPOConfig(variant="hydra", steps=100, batch_size=128, mini_batch_size=32, ppo_epochs=2, lr=1e-3,
                     max_new_tokens=5, temperature=1.0, kl_coef=2.0, kl_estimator="k1", vf_coef=0.5,
                     max_grad_norm=5.0, lora={"r": 8, "alpha": 16}, data={"max_prompt_len": 16, "max_len": 24},
                     run={"progress": True, "resume": False})


def _default_grpo():
    from hydra_kernels.rlhf.config import GRPOConfig
    # Critic-free RL on the task's verifiable reward (the gold reward): GRPO's group advantages over G = 8
    # completions per prompt, no KL (β = 0, TRL's default), one optimizer step per rollout.
    return GRPOConfig(estimator="grpo", steps=150, batch_size=128, num_generations=8, lr=1e-3, max_new_tokens=5,
                      temperature=1.0, lora={"r": 8, "alpha": 16}, data={"max_prompt_len": 16, "max_len": 24},
                      run={"progress": True, "resume": False})


ALGOS = ("ppo", "grpo")


@dataclass
class DemoConfig:
    """Everything the demo runs with. Override any field as `key=value` (dotted into sections):
    `task.n_sft=8000`, `model.hidden_size=96`, `sft.lr=1e-3`, `ppo.steps=60`, `pretrain_steps=0`."""

    out: str = "runs/demo"
    algo: str = "ppo"                # the RL stage: ppo (Hydra-PPO, learned reward) or grpo (gold reward)
    seed: int = 0
    pretrain_steps: int = 1200       # LM-only steps on correct worked examples before Hydra-SFT (0 = none)
    pretrain_batch_size: int = 128
    pretrain_lr: float = 3e-3
    eval_temperature: float = 1.0    # decoding used to compare the SFT and PPO policies (1.0 = as sampled in PPO)
    threads: int | None = None       # torch CPU threads of every stage (run.threads); None = 1 on the CPU (tiny model)
    # 80% of the wrong demonstrations forget (or invent) a carry, the rest are off by one or two.
    task: TaskConfig = field(default_factory=lambda: TaskConfig(n_sft=28800, n_pref=28800, n_ppo=4000,
                                                                carry_error_share=0.8, n_eval_prompts=512,
                                                                n_eval_pairs=512))
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    sft: typing.Any = field(default_factory=_default_sft)      # rlhf.SFTConfig
    ppo: typing.Any = field(default_factory=_default_ppo)      # rlhf.PPOConfig
    grpo: typing.Any = field(default_factory=_default_grpo)    # rlhf.GRPOConfig

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo: must be one of {ALGOS}, got {self.algo!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed: need an int >= 0, got {self.seed!r}")
        if not isinstance(self.pretrain_steps, int) or self.pretrain_steps < 0:
            raise ValueError(f"pretrain_steps: need an int >= 0, got {self.pretrain_steps!r}")
        if not isinstance(self.pretrain_batch_size, int) or self.pretrain_batch_size < 1:
            raise ValueError(f"pretrain_batch_size: need a positive int, got {self.pretrain_batch_size!r}")
        if not self.pretrain_lr > 0:
            raise ValueError(f"pretrain_lr: need a positive number, got {self.pretrain_lr!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 1):
            raise ValueError(f"threads: need an int >= 1 or null, got {self.threads!r}")
        if not self.eval_temperature >= 0:
            raise ValueError(f"eval_temperature: need a number >= 0 (0 = greedy), got {self.eval_temperature!r}")


def default_config(algo: str = "ppo") -> DemoConfig:
    """The full demo for `algo`. grpo learns from the gold reward itself, so its SFT stage trains no reward head
    (reward_coef 0, a token set of pairs) and imitates the noisy demonstrations for one pass (150 steps) after 800
    pretraining steps: the whole run fits 5 minutes on 2 cores with 1 thread."""
    if algo != "grpo":
        return DemoConfig(algo=algo)
    from hydra_kernels.rlhf.config import apply_overrides
    cfg = DemoConfig(algo="grpo", pretrain_steps=800,
                     task=TaskConfig(n_sft=9600, n_pref=64, n_ppo=4000, carry_error_share=0.8, n_eval_prompts=512,
                                     n_eval_pairs=512))
    cfg.sft = apply_overrides(cfg.sft, ["epochs=1", "reward_coef=0.0"])
    return cfg


def quick_config(algo: str = "ppo") -> DemoConfig:
    """A reduced run for CI (well under a minute on 2 cores); its numbers show the plumbing, not quality."""
    from hydra_kernels.rlhf.config import apply_overrides
    cfg = DemoConfig(
        algo=algo,
        pretrain_steps=20,
        task=TaskConfig(n_sft=256, n_pref=256, n_ppo=128, n_eval_prompts=32, n_eval_pairs=32),
        model=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    )
    cfg.sft = apply_overrides(cfg.sft, ["epochs=1", "batch_size=32"])
    cfg.ppo = apply_overrides(cfg.ppo, ["steps=3", "batch_size=16", "mini_batch_size=8", "ppo_epochs=1"])
    cfg.grpo = apply_overrides(cfg.grpo, ["steps=3", "batch_size=16", "num_generations=4"])
    return cfg


# ------------------------------------------------------------------------------------------------ overrides
def _coerce(name: str, value, tp):
    """Convert a YAML-parsed override to a plain field type (int, float, bool, str, or one of them | None);
    ValueError names the key."""
    options = typing.get_args(tp)
    if type(None) in options:        # `int | None`: null stays None, anything else converts to the other type
        if value is None:
            return None
        (tp,) = [t for t in options if t is not type(None)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value == int(value):
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"{name}: expected {tp.__name__}, got {value!r}")


def _replace_fields(obj, values: dict, prefix: str):
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"{prefix}{key}: unknown setting (known: {', '.join(sorted(names))})")
        if isinstance(value, dict):
            raise ValueError(f"{prefix}{key}: expected a value, got a section")
        changes[key] = _coerce(prefix + key, value, hints[key])
    return dataclasses.replace(obj, **changes)


def apply_demo_overrides(cfg: DemoConfig, pairs: Sequence[str]) -> DemoConfig:
    """A new DemoConfig with `key=value` overrides: top-level fields, `task.*`, `model.*`, and `sft.*` / `ppo.*` /
    `grpo.*` (passed to the library's own config overrides, so every SFTConfig / PPOConfig / GRPOConfig field is
    reachable)."""
    from hydra_kernels.rlhf.config import apply_overrides, parse_overrides

    parsed = parse_overrides(pairs)          # ValueError on malformed pairs
    by_section: dict[str, list[str]] = {"sft": [], "ppo": [], "grpo": []}
    for pair in pairs:
        key = pair.split("=", 1)[0].strip()
        head = key.split(".", 1)[0]
        if head in by_section:
            if "." not in key:
                raise ValueError(f"{key}: name a field, e.g. {head}.lr=1e-3")
            by_section[head].append(pair.strip()[len(head) + 1:])
    top = {k: v for k, v in parsed.items() if k not in ("task", "model", "sft", "ppo", "grpo")}
    cfg = _replace_fields(cfg, top, "") if top else cfg
    if "task" in parsed:
        cfg = dataclasses.replace(cfg, task=_replace_fields(cfg.task, parsed["task"], "task."))
    if "model" in parsed:
        cfg = dataclasses.replace(cfg, model=_replace_fields(cfg.model, parsed["model"], "model."))
    for name in ("sft", "ppo", "grpo"):
        if by_section[name]:
            try:
                new = apply_overrides(getattr(cfg, name), by_section[name])
            except ValueError as e:
                raise ValueError(f"{name}.{e}") from None
            cfg = dataclasses.replace(cfg, **{name: new})
    return cfg


def _finalise(cfg: DemoConfig) -> DemoConfig:
    """Point every stage at its folder under cfg.out and give them the demo's seed (`seed` wins over any
    task.seed / sft.run.seed / ppo.run.seed override: one number reproduces the whole run)."""
    from hydra_kernels.rlhf.config import apply_overrides
    out = Path(cfg.out)
    task = dataclasses.replace(cfg.task, seed=cfg.seed)
    threads = [] if cfg.threads is None else [f"run.threads={cfg.threads}"]     # `threads` wins too
    sft = apply_overrides(cfg.sft, [f"run.output_dir={out / 'sft'}", f"run.seed={cfg.seed}", *threads])
    ppo = apply_overrides(cfg.ppo, [f"run.output_dir={out / 'ppo'}", f"run.seed={cfg.seed}", *threads])
    grpo = apply_overrides(cfg.grpo, [f"run.output_dir={out / 'grpo'}", f"run.seed={cfg.seed}", *threads])
    return dataclasses.replace(cfg, task=task, sft=sft, ppo=ppo, grpo=grpo)


# ------------------------------------------------------------------------------------------------ stages
def pretrain(model, tokenizer, texts: Sequence[tuple[str, str]], steps: int, batch_size: int, lr: float,
             seed: int, log_path: Path | None = None, progress: bool = True) -> list[dict]:
    """Causal-LM steps on correct worked examples (prompt, answer): what a pretrained base would already know.

    The loss counts the answer and its EOS only (the operands are random, there is nothing to learn there).
    Linear warm-up over 5% of the steps, then linear decay to 10% of `lr`.
    """
    import torch
    import torch.nn.functional as F

    from hydra_kernels.rlhf.data import collate_sequences, encode_prompt, encode_response

    if steps <= 0:
        return []
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.1, 1.0 - s / steps))
    history = []
    log = open(log_path, "w") if log_path is not None else None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="pretrain (correct sums)", unit="step")
    model.train()
    try:
        for step in range(steps):
            idx = torch.randint(len(texts), (batch_size,), generator=g).tolist()
            batch = collate_sequences([encode_prompt(tokenizer, texts[i][0], 64) for i in idx],
                                      [encode_response(tokenizer, texts[i][1]) for i in idx],
                                      tokenizer.pad_token_id)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids).logits[:, :-1]
            targets = batch.input_ids[:, 1:].masked_fill(batch.loss_mask[:, 1:] == 0, -100)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if (step + 1) % 50 == 0 or step + 1 == steps:
                rec = {"step": step + 1, "pretrain/lm_loss": loss.item()}
                history.append(rec)
                if log is not None:
                    log.write(json.dumps(rec) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    model.eval()
    return history


def evaluate_policies(models, tokenizer, prompts: Sequence[str], *, temperature: float, max_new_tokens: int,
                      seed: int, batch_size: int = 64, progress: bool = True, label: str = "ppo") -> dict:
    """Gold reward, exact-answer rate and learned reward of the SFT policy ("reference": LoRA off, under "sft")
    and the trained policy ("actor", under `label`) on `prompts`, with the same decoding and sampling seed; plus
    KL(actor ‖ SFT) per sequence, exact over the vocabulary at every position the actor visits (summed over its
    response tokens)."""
    import torch

    from hydra_kernels.rlhf.data import tokenize_prompts
    from hydra_kernels.rlhf.rollout import decode_responses, generate
    from hydra_kernels.rlhf.demo.task import gold_reward, mean_and_stderr

    out = {}
    device = models.device
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=2 * len(prompts), desc="evaluate (held-out prompts)", unit="prompt")
    try:
        for which, name in (("reference", "sft"), ("actor", label)):
            gen = torch.Generator(device=device).manual_seed(seed)
            gold, learned, kl, samples = [], [], [], []
            for i in range(0, len(prompts), batch_size):
                chunk = list(prompts[i:i + batch_size])
                ids, mask = tokenize_prompts(tokenizer, chunk, 64)
                ro = generate(models.policy(which), ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              temperature=temperature, generator=gen)
                texts = decode_responses(tokenizer, ro)
                ended = ro.ended.tolist()
                gold += [gold_reward(p, t, e) for p, t, e in zip(chunk, texts, ended)]
                sc = models.score(ro, temperature=1.0, kl_estimator="full")
                learned += sc.scores.tolist()
                kl += sc.kl.sum(1).tolist()
                samples += [{"prompt": p, "completion": t, "ended": e} for p, t, e in zip(chunk, texts, ended)]
                if bar is not None:
                    bar.update(len(chunk))
            m, se = mean_and_stderr(gold)
            out[name] = {"gold_reward": m, "gold_reward_se": se,
                          "exact": sum(g == 1.0 for g in gold) / len(gold),
                          "learned_reward": mean_and_stderr(learned)[0],
                          "kl": mean_and_stderr(kl)[0], "kl_se": mean_and_stderr(kl)[1],
                          "n": len(gold), "samples": samples[:8], "_gold": gold}
    finally:
        if bar is not None:
            bar.close()
    return out


def _plot(history: list[dict], path: Path, title: str) -> str:
    from hydra_kernels.rlhf.demo.plot import COLORS, Panel, line_plot_png

    steps = [h["step"] for h in history]

    def col(key):
        return [h.get(key) if h.get(key) is not None else float("nan") for h in history]

    panels = [Panel("gold reward of the rollouts (never trained on)", [(steps, col("objective/gold_reward"))],
                    colors=[COLORS[2]]),
              Panel("learned reward (reward head, LoRA off)", [(steps, col("objective/scores"))], colors=[COLORS[0]]),
              Panel("KL to the SFT policy (nats per response)", [(steps, col("objective/kl"))], colors=[COLORS[1]],
                    xlabel="PPO step")]
    return line_plot_png(path, panels, title=title)


def _plot_grpo(history: list[dict], path: Path, title: str) -> str:
    from hydra_kernels.rlhf.demo.plot import COLORS, Panel, line_plot_png

    steps = [h["step"] for h in history]

    def col(key):
        return [h.get(key) if h.get(key) is not None else float("nan") for h in history]

    panels = [Panel("gold reward of the rollouts (the verifiable reward trained on)", [(steps, col("reward"))],
                    colors=[COLORS[2]]),
              Panel("share of groups with equal rewards (no gradient)", [(steps, col("frac_reward_zero_std"))],
                    colors=[COLORS[0]]),
              Panel("completion length (tokens, EOS included)", [(steps, col("completions/mean_length"))],
                    colors=[COLORS[1]], xlabel="step")]
    return line_plot_png(path, panels, title=title)


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    v = max(len(x) for _, x in rows)
    line = "+" + "-" * (w + 2) + "+" + "-" * (v + 2) + "+"
    body = [f"| {k.ljust(w)} | {x.rjust(v)} |" for k, x in rows]
    return "\n".join([line, *body, line])


def run_demo(cfg: DemoConfig, *, progress: bool = True, stream=None) -> dict:
    """Run every stage; returns the summary (also written to <out>/summary.json and printed to `stream`)."""
    t_start = time.perf_counter()
    import torch

    from hydra_kernels import rlhf
    from hydra_kernels.rlhf.demo.model import build_tiny_model, save_model
    from hydra_kernels.rlhf.demo.task import ArithmeticTask, gold_reward, is_slip, mean_and_stderr
    from hydra_kernels.rlhf.demo.tokenizer import build_char_tokenizer
    from hydra_kernels.rlhf.threads import set_threads

    stream = stream if stream is not None else sys.stdout
    cfg = _finalise(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def say(msg):
        print(msg, file=stream, flush=True)

    # 1. data --------------------------------------------------------------------------------------------
    t = time.perf_counter()
    task = ArithmeticTask(cfg.task)
    paths = task.write(out / "data")
    say(f"[1/5] task: a+b= with a, b <= {cfg.task.max_operand}; {cfg.task.n_sft} demonstrations "
        f"({cfg.task.demo_error_rate:.0%} wrong), {cfg.task.n_pref} preference pairs, {cfg.task.n_ppo} PPO prompts "
        f"-> {out / 'data'}")

    # 2. base model and tokenizer, saved and reloaded like a user's checkpoint ----------------------------
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, cfg.model, seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    # Pretraining runs on the CPU here: the thread count the SFT stage will choose (rlhf.threads).
    set_threads(cfg.sft.run.threads, torch.device("cpu"), model)
    if cfg.pretrain_steps:
        texts = [(f"{a}+{b}=", str(a + b)) for a, b in task.train_operands()]
        pretrain(model, tok, texts, cfg.pretrain_steps, cfg.pretrain_batch_size, cfg.pretrain_lr, cfg.seed,
                 out / "base_pretrain_metrics.jsonl", progress)
    save_model(model, tok, out / "base")
    del model
    model, tok = rlhf.load_model_and_tokenizer(rlhf.ModelConfig(path=str(out / "base")))
    timings["data+base"] = time.perf_counter() - t
    say(f"[2/5] base: Llama {cfg.model.num_layers}x{cfg.model.hidden_size}, {n_params / 1e6:.2f}M parameters, "
        f"char tokenizer ({len(tok)} tokens)" + (f", pretrained {cfg.pretrain_steps} steps on correct sums"
                                                 if cfg.pretrain_steps else "") + f" -> {out / 'base'}")

    demos = rlhf.load_sft_jsonl(paths["sft"])
    pairs = rlhf.load_preference_jsonl(paths["pref"])
    prompts = rlhf.load_prompt_jsonl(paths["ppo"])
    eval_pairs = rlhf.load_preference_jsonl(paths["eval_pairs"])
    eval_prompts = rlhf.load_prompt_jsonl(paths["eval_prompts"])

    # 3. Hydra-SFT ---------------------------------------------------------------------------------------
    t = time.perf_counter()
    sft_cfg = rlhf.apply_overrides(cfg.sft, [f"run.progress={str(progress).lower()}"])
    sft = rlhf.hydra_sft(model, tok, demos, pairs, sft_cfg, eval_pairs=eval_pairs)
    timings["sft"] = time.perf_counter() - t
    acc = sft.metrics.get("eval/reward_accuracy", float("nan"))
    # The held-out pairs mix arithmetic slips (hard: the head must redo the sum) with swapped / dropped digits
    # (easy); report the slips on their own too. Measured now: PPO patches the SFT model in place.
    slips = [p for p in eval_pairs if is_slip(p.prompt, p.rejected)]
    acc_slips = (rlhf.evaluate_pairs(sft.model, sft.reward_head, tok, slips, sft_cfg)["reward_accuracy"]
                 if slips else float("nan"))
    say(f"[3/5] Hydra-SFT ({sft_cfg.mode}): reward-head accuracy on {len(eval_pairs)} held-out pairs {acc:.1%}, "
        f"margin {sft.metrics.get('eval/reward_margin', float('nan')):.2f} -> {sft.output_dir}")

    # 4. Hydra-PPO on the learned reward, or critic-free RL (GRPO, ...) on the gold reward ----------------------
    t = time.perf_counter()

    def gold(ps, completions, ended):
        return [gold_reward(p, c, e) for p, c, e in zip(ps, completions, ended)]

    label = cfg.algo
    if label == "ppo":
        rl_cfg = rlhf.apply_overrides(cfg.ppo, [f"run.progress={str(progress).lower()}"])
        rl = rlhf.train_ppo(sft.model, sft.reward_head, tok, prompts, rl_cfg, gold_reward_fn=gold)
        say(f"[4/5] Hydra-PPO ({rl_cfg.variant}): {rl_cfg.steps} steps x {rl_cfg.batch_size} prompts -> "
            f"{out / 'ppo'} (metrics.jsonl, final/)")
    else:
        # The gold reward is the verifiable reward here: what GRPO-style training on a checkable task uses.
        rl_cfg = rlhf.apply_overrides(cfg.grpo, [f"run.progress={str(progress).lower()}"])
        rl = rlhf.train_grpo(sft.model, tok, prompts, rl_cfg, reward_fn=gold, reward_head=sft.reward_head)
        say(f"[4/5] {rl_cfg.estimator} (critic-free, one base, gold reward): {rl_cfg.steps} steps x "
            f"{rl_cfg.batch_size // rl_cfg.num_generations} prompts x {rl_cfg.num_generations} completions -> "
            f"{out / 'grpo'} (metrics.jsonl, final/)")
    timings[label] = time.perf_counter() - t
    last = rl.history[-1] if rl.history else {}

    # 5. evaluation, plot, summary -----------------------------------------------------------------------
    t = time.perf_counter()
    ev = evaluate_policies(rl.models, tok, eval_prompts, temperature=cfg.eval_temperature,
                           max_new_tokens=rl_cfg.max_new_tokens, seed=cfg.seed + 12345, progress=progress,
                           label=label)
    # Both policies answer the same prompts: the difference is paired, its s.e. from per-prompt differences.
    diffs = [b - a for a, b in zip(ev["sft"].pop("_gold"), ev[label].pop("_gold"))]
    d_mean, d_se = mean_and_stderr(diffs)
    digits = len(str(cfg.task.max_operand))
    if label == "ppo":
        png = _plot(rl.history, out / "ppo_curves.png", f"Hydra-PPO on {digits}-digit addition (seed {cfg.seed})")
    else:
        png = _plot_grpo(rl.history, out / "grpo_curves.png",
                         f"{rl_cfg.estimator} on {digits}-digit addition (seed {cfg.seed})")
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    final_keys = (("objective/kl", "objective/scores", "objective/gold_reward", "objective/entropy") if label == "ppo"
                  else ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "frac_reward_zero_std"))
    summary = {
        "algo": label,
        "reward_accuracy": acc, "reward_accuracy_slips": acc_slips, "n_eval_slip_pairs": len(slips),
        "reward_margin": sft.metrics.get("eval/reward_margin"),
        "n_eval_pairs": len(eval_pairs), "n_eval_prompts": len(eval_prompts),
        "eval_temperature": cfg.eval_temperature,
        "gold_reward_sft": ev["sft"]["gold_reward"], "gold_reward_sft_se": ev["sft"]["gold_reward_se"],
        f"gold_reward_{label}": ev[label]["gold_reward"], f"gold_reward_{label}_se": ev[label]["gold_reward_se"],
        "gold_reward_diff": d_mean, "gold_reward_diff_se": d_se,
        "exact_sft": ev["sft"]["exact"], f"exact_{label}": ev[label]["exact"],
        "learned_reward_sft": ev["sft"]["learned_reward"], f"learned_reward_{label}": ev[label]["learned_reward"],
        f"kl_{label}_vs_sft": ev[label]["kl"], f"kl_{label}_vs_sft_se": ev[label]["kl_se"],
        "final_step": {k: last.get(k) for k in final_keys},
        "samples": {"sft": ev["sft"]["samples"], label: ev[label]["samples"]},
        "timings_s": timings, "torch_threads": torch.get_num_threads(),
        "paths": {"data": str(out / "data"), "base": str(out / "base"), "sft": str(out / "sft"),
                  f"{label}_metrics": str(out / label / rl_cfg.run.metrics_file), "plot": png},
        "config": {"seed": cfg.seed, "algo": label, "pretrain_steps": cfg.pretrain_steps,
                   "task": dataclasses.asdict(cfg.task), "model": dataclasses.asdict(cfg.model),
                   "sft": rlhf.config_to_dict(cfg.sft), label: rlhf.config_to_dict(rl_cfg)},
    }
    with open(out / "summary.json.tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(out / "summary.json.tmp", out / "summary.json")

    def pm(m, s):
        return f"{m:+.3f} ± {s:.3f}" if m < 0 else f"{m:.3f} ± {s:.3f}"

    z = d_mean / d_se if d_se > 0 else (0.0 if d_mean == 0 else float("inf"))
    dec = "sampled, T=%g" % cfg.eval_temperature if cfg.eval_temperature > 0 else "greedy"
    name = "PPO" if label == "ppo" else rl_cfg.estimator.upper().replace("_", " ")
    rows = [
        (f"reward-head accuracy, {len(eval_pairs)} held-out pairs", f"{acc:.1%}"),
        (f"  of which {len(slips)} arithmetic slips (off by 1, 2 or 10)", f"{acc_slips:.1%}"),
        (f"gold reward, SFT policy ({len(eval_prompts)} held-out prompts, {dec})",
         pm(ev["sft"]["gold_reward"], ev["sft"]["gold_reward_se"])),
        (f"gold reward, {name} policy (same prompts, same decoding)",
         pm(ev[label]["gold_reward"], ev[label]["gold_reward_se"])),
        (f"{name} - SFT (paired s.e.)", f"{d_mean:+.3f} ± {d_se:.3f} ({z:.1f} s.e.)"),
        (f"exact answers, SFT -> {name}", f"{ev['sft']['exact']:.1%} -> {ev[label]['exact']:.1%}"),
        (f"learned reward, SFT -> {name}",
         f"{ev['sft']['learned_reward']:.2f} -> {ev[label]['learned_reward']:.2f}"),
        (f"KL({name} || SFT), nats per response", pm(ev[label]["kl"], ev[label]["kl_se"])),
        (f"wall time (data+base / SFT / {name} / eval)",
         f"{timings['total']:.0f} s ({timings['data+base']:.0f} / {timings['sft']:.0f} / {timings[label]:.0f} / "
         f"{timings['eval']:.0f})"),
    ]
    if cfg.sft.reward_coef == 0:          # the reward head was not trained: its numbers mean nothing
        rows = [r for r in rows if not r[0].startswith(("reward-head", "  of which", "learned reward"))]
    say(f"[5/5] evaluated on held-out prompts -> {out / 'summary.json'}, {png}\n")
    say(_table(rows))
    return summary
