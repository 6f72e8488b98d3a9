"""The PPO loop: rollout → score → advantages → minibatch updates, with metrics, checkpoints and resume.

Determinism: the prompts of step s, the sampling generator and the minibatch order are all derived from
(run.seed, s), never from a global RNG, so a run resumed from the checkpoint after step s continues exactly
as the uninterrupted run would (same weights bit for bit on the same machine and thread count).

Faults: a batch whose rewards or scoring outputs are not finite is skipped (warning + counter
skipped/nonfinite_reward); a minibatch whose loss or gradient norm is not finite is not applied (warning +
counter skipped/nonfinite_loss). Weights are therefore never written from NaN, and a checkpoint refuses
non-finite weights.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from hydra_kernels.integrations.checkpoint import check_replaceable
from hydra_kernels.rlhf.advantages import gae, kl_controller, masked_mean, per_token_rewards, shape_scores, whiten
from hydra_kernels.rlhf.checkpoint import (CheckpointSchedule, check_resume_config, check_resume_inputs, copy_params_,
                                           inputs_digest, latest_checkpoint, load_checkpoint, restore_rng,
                                           save_checkpoint, write_dir_atomically)
from hydra_kernels.rlhf.config import PPOConfig, config_to_dict
from hydra_kernels.rlhf.data import check_tokenizer, encode_prompt, left_pad
from hydra_kernels.rlhf.losses import ppo_loss
from hydra_kernels.rlhf.models import PPOModels, build_ppo_models, resolve_device
from hydra_kernels.rlhf.optim import build_ppo_optimizer, clip_grad_norm_per_role, ppo_roles
from hydra_kernels.rlhf.rollout import Rollout, decode_responses, generate
from hydra_kernels.rlhf.scoring import Scores, policy_and_values, score_rollout

RewardFn = Callable[[list, list, list], Sequence[float]]   # (prompts, completions, ended) -> one float each


@dataclass
class PPOResult:
    models: PPOModels
    history: list[dict] = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    output_dir: Path | None = None


# ------------------------------------------------------------------------------------ deterministic order
def derived_seed(seed: int, step: int, salt: int) -> int:
    """A seed for (run seed, step, purpose) without any global state."""
    return ((seed * 1_000_003 + step) * 16 + salt) % (2 ** 63)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Prompts of `step`: consecutive slices of a fresh permutation per pass over the data (epoch)."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(derived_seed(seed, epoch, 1))
        out.append(int(torch.randperm(n, generator=g)[i]))
    return out


def seed_everything(seed: int) -> None:
    """Seed python, torch (CPU and CUDA) and numpy (if imported): LoRA A matrices are drawn from the global
    generator when a model is patched, so the same run.seed must give the same initial adapters."""
    import random
    import sys
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


def _finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ------------------------------------------------------------------------------------------------ one step
class PPOTrainer:
    """Holds the models, optimizer and KL controller; `step(s)` runs PPO step s. `train_ppo` drives it."""

    def __init__(self, models: PPOModels, tokenizer, prompts: Sequence[str], cfg: PPOConfig, *,
                 reward_fn: RewardFn | None = None, gold_reward_fn: RewardFn | None = None):
        check_tokenizer(tokenizer)
        if not prompts:
            raise ValueError("prompts: need at least one prompt")
        if cfg.reward_source == "function" and reward_fn is None:
            raise ValueError("reward_fn: required when reward_source == 'function'")
        self.models, self.tokenizer, self.prompts, self.cfg = models, tokenizer, list(prompts), cfg
        self.reward_fn, self.gold_reward_fn = reward_fn, gold_reward_fn
        self.prompt_tokens = [encode_prompt(tokenizer, p, cfg.data.max_prompt_len) for p in self.prompts]
        if any(not t for t in self.prompt_tokens):
            raise ValueError("prompts: an empty prompt with no BOS token gives the model nothing to condition on")
        if models.hydra is not None and models.hydra.tokenizer is None:
            models.hydra.tokenizer = tokenizer      # so hydra.merge(...) writes a directory usable on its own
        self.params = models.named_trainable()
        self.optimizer = build_ppo_optimizer(models, self.params, cfg)
        self.kl_ctl = kl_controller(cfg)
        self.counters = {"skipped/nonfinite_reward": 0, "skipped/nonfinite_loss": 0}
        self.device = models.device

    # -- state for checkpoints
    def trainer_state(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict(), "counters": dict(self.counters)}

    def load_trainer_state(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.counters.update(state["counters"])

    def _rollout(self, step: int) -> tuple[list[str], Rollout]:
        cfg = self.cfg
        idx = batch_indices(len(self.prompts), cfg.batch_size, cfg.run.seed, step)
        # A compiled rollout pads every batch to the longest prompt of the data set: one shape, one compilation.
        width = max(map(len, self.prompt_tokens)) if cfg.compile_rollout else None
        ids, mask = left_pad([self.prompt_tokens[i] for i in idx], self.tokenizer.pad_token_id, width)
        gen = torch.Generator(device=self.device).manual_seed(derived_seed(cfg.run.seed, step, 2))
        ro = generate(self.models.policy("actor"), ids.to(self.device), mask.to(self.device),
                      max_new_tokens=cfg.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                      pad_token_id=self.tokenizer.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p,
                      generator=gen, compile=cfg.compile_rollout)
        return [self.prompts[i] for i in idx], ro

    def _rewards(self, prompts, texts, ro: Rollout, scores: Scores) -> tuple[torch.Tensor, dict]:
        cfg, extra = self.cfg, {}
        ended = ro.ended.tolist()
        if cfg.reward_source == "function":
            r = torch.as_tensor([float(x) for x in self.reward_fn(prompts, texts, ended)], dtype=torch.float32,
                                device=self.device)
            if r.shape != (len(prompts),):
                raise ValueError(f"reward_fn: returned {r.numel()} rewards for {len(prompts)} completions")
            extra["objective/reward_head"] = scores.scores.mean().item()
        else:
            r = scores.scores
        r = shape_scores(r, ro.ended, cfg.reward_clip, cfg.missing_eos_penalty)
        if self.gold_reward_fn is not None:
            gold = [float(x) for x in self.gold_reward_fn(prompts, texts, ended)]
            extra["objective/gold_reward"] = sum(gold) / len(gold)
        return r, extra

    def step(self, step: int) -> dict:
        cfg, models = self.cfg, self.models
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        prompts, ro = self._rollout(step)
        t1 = time.perf_counter()
        scores = score_rollout(models, ro, temperature=cfg.temperature, kl_estimator=cfg.kl_estimator)
        texts = decode_responses(self.tokenizer, ro)
        r, extra = self._rewards(prompts, texts, ro, scores)
        t2 = time.perf_counter()
        mask = ro.response_mask
        metrics = {"step": step + 1, "episode": (step + 1) * cfg.batch_size, "time/rollout": t1 - t0,
                   "time/score": t2 - t1, **extra}
        if not _finite(r, scores.logprobs, scores.ref_logprobs, scores.kl, scores.values):
            self.counters["skipped/nonfinite_reward"] += 1
            warnings.warn(f"PPO step {step + 1}: non-finite reward or scores; batch skipped "
                          f"({self.counters['skipped/nonfinite_reward']} so far)", RuntimeWarning, stacklevel=2)
            metrics.update(self._summary(ro, scores, r, skipped=True))
            metrics["time/update"] = 0.0
            return self._finish(metrics)

        kl_coef = self.kl_ctl.value
        rewards = per_token_rewards(r, scores.kl, mask, kl_coef)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        adv, returns = gae(rewards, scores.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, mask)
        stats = self._update(step, ro, scores, adv, returns)
        t3 = time.perf_counter()
        metrics.update(self._summary(ro, scores, r, skipped=False))
        metrics.update(stats)
        metrics["time/update"] = t3 - t2
        # The controller sees the KL of this batch (summed over tokens, mean over sequences), as in Ziegler et al.
        self.kl_ctl.update(metrics["objective/kl"], cfg.batch_size)
        return self._finish(metrics)

    def _summary(self, ro: Rollout, scores: Scores, r: torch.Tensor, skipped: bool) -> dict:
        kl_seq = scores.kl.sum(1)
        non_score = (-self.kl_ctl.value * kl_seq).mean().item()
        return {"objective/kl": kl_seq.mean().item(), "objective/entropy": scores.entropy.sum(1).mean().item(),
                "objective/scores": r.mean().item(), "objective/non_score_reward": non_score,
                "objective/rlhf_reward": r.mean().item() + non_score, "objective/kl_coef": self.kl_ctl.value,
                "val/mean_value": masked_mean(scores.values, ro.response_mask).item(),
                "env/response_length": ro.lengths.float().mean().item(),
                "env/ended": ro.ended.float().mean().item(), "skipped": skipped}

    def _finish(self, metrics: dict) -> dict:
        mib, what = peak_memory(self.device)
        metrics["memory/peak"] = mib
        metrics["memory/peak_source"] = what
        metrics.update(self.counters)
        # Strict JSON: a non-finite statistic (a skipped batch's NaN reward) is written as null.
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}

    def _update(self, step: int, ro: Rollout, scores: Scores, adv, returns) -> dict:
        cfg, models = self.cfg, self.models
        B, mb = cfg.batch_size, cfg.mini_batch_size
        gen = torch.Generator().manual_seed(derived_seed(cfg.run.seed, step, 3))
        params = list(self.params.values())
        roles = ppo_roles(models, self.params)
        sums: dict[str, float] = {}
        n = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=gen).to(self.device)
            for start in range(0, B, mb):
                idx = order[start:start + mb]
                sub = ro.select(idx)
                logp, ent, values = policy_and_values(models, sub, temperature=cfg.temperature,
                                                      need_entropy=cfg.entropy_coef > 0)
                loss, st = ppo_loss(logp, scores.logprobs[idx], adv[idx], values, scores.values[idx], returns[idx],
                                    sub.response_mask, ent, cliprange=cfg.cliprange,
                                    cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef,
                                    entropy_coef=cfg.entropy_coef)
                self.optimizer.zero_grad(set_to_none=True)
                if not _finite(loss):
                    self._skip_loss(step, "loss")
                    continue
                loss.backward()
                if cfg.clip_grad_per_role:
                    norms = clip_grad_norm_per_role(roles, cfg.max_grad_norm)
                    st["policy/grad_norm"], st["val/grad_norm"] = norms["actor"], norms["critic"]
                else:
                    st["policy/grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if not all(_finite(v) for k, v in st.items() if k.endswith("/grad_norm")):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._skip_loss(step, "gradient norm")
                    continue
                self.optimizer.step()
                n += 1
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        self.optimizer.zero_grad(set_to_none=True)
        return {k: v / n for k, v in sums.items()} if n else {}

    def _skip_loss(self, step: int, what: str) -> None:
        self.counters["skipped/nonfinite_loss"] += 1
        warnings.warn(f"PPO step {step + 1}: non-finite {what}; minibatch update skipped "
                      f"({self.counters['skipped/nonfinite_loss']} so far)", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------- driver
def _read_metrics(path: Path, before_step: int) -> list[dict]:
    """Metrics lines of steps ≤ before_step (a resumed run rewrites the steps after its checkpoint)."""
    if not path.is_file():
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if rec.get("step", 0) <= before_step:
                    out.append(rec)
    return out


def save_policy(out_dir: str | os.PathLike, models: PPOModels, cfg: PPOConfig, extra: dict | None = None) -> Path:
    """The trained PPO state (actor/critic adapters, or actor/critic weights for `full`, value head, reward
    head) as policy.safetensors + policy.json, written atomically. Load it with `load_policy`."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in models.named_trainable().items()}
    for name, p in models.reward_head.named_parameters():
        tensors[f"reward_head.{name}"] = p.detach().cpu().contiguous()
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"models: {k!r} is not finite; refusing to save NaN/inf weights")
    meta = {"format": "hydra_kernels.rlhf.policy", "variant": models.variant, "config": config_to_dict(cfg),
            **(extra or {})}

    def fill(tmp: Path):
        save_file(tensors, str(tmp / "policy.safetensors"))
        with open(tmp / "policy.json", "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
    return write_dir_atomically(out_dir, fill, marker="policy.json")


def load_policy(path: str | os.PathLike, models: PPOModels) -> dict:
    """Load save_policy's tensors into models built with the same variant and LoRA settings; returns the JSON."""
    from safetensors.torch import load_file
    path = Path(path)
    try:
        with open(path / "policy.json") as f:
            meta = json.load(f)
        tensors = load_file(str(path / "policy.safetensors"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"path: {str(path)!r} holds no saved policy: {e}") from None
    if meta.get("variant") != models.variant:
        raise ValueError(f"path: saved variant {meta.get('variant')!r} does not match the models' {models.variant!r}")
    target = dict(models.named_trainable())
    target.update({f"reward_head.{n}": p for n, p in models.reward_head.named_parameters()})
    copy_params_(target, tensors, str(path))
    return meta


def train_ppo(model, reward_head, tokenizer, prompts: Sequence[str], cfg: PPOConfig, *,
              reward_fn: RewardFn | None = None, gold_reward_fn: RewardFn | None = None,
              callback: Callable[[int, dict], None] | None = None) -> PPOResult:
    """Run PPO on the SFT result (`model` + `reward_head`) over `prompts` (strings).

    hydra / j-hydra patch `model` in place; lora / full keep it as the frozen reference and copy it three
    times. reward_fn(prompts, completions, ended) ->
    floats is used when cfg.reward_source == "function"; gold_reward_fn (same signature) is only logged as
    objective/gold_reward. callback(step, metrics) runs after every step. Writes
    <output_dir>/<metrics_file> (one JSON line per step), checkpoints under <output_dir>/checkpoints every
    run.checkpoint_every steps / run.checkpoint_minutes (and at the end), and the final policy to
    <output_dir>/final when the run completes. With run.resume, an existing checkpoint in <output_dir> is continued (one of a run on another
    SFT model or other prompts is refused: ValueError naming run.output_dir). The global RNGs are
    seeded with run.seed first (the LoRA A matrices are drawn when the model is patched).
    """
    if not isinstance(cfg, PPOConfig):
        raise ValueError(f"cfg: expected a PPOConfig, got {type(cfg).__name__}")
    check_tokenizer(tokenizer)
    # Up front, not after the run: output_dir/final must be free or an earlier PPO result (e.g. not Hydra-SFT's).
    check_replaceable(Path(cfg.run.output_dir) / "final", name="run.output_dir", marker="policy.json",
                      foreign=("sft.json",))
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    model.to(device)
    reward_head = reward_head.to(device)
    # What this run starts from, stored with its checkpoints: another run's checkpoints in output_dir (on another
    # SFT model or other prompts) are refused rather than resumed (their paths may change, their contents not).
    inputs = inputs_digest(modules={"model.path": torch.nn.ModuleList([model, reward_head])},
                           data={"data.prompt_path": list(prompts)})
    models = build_ppo_models(model, reward_head, cfg)
    trainer = PPOTrainer(models, tokenizer, prompts, cfg, reward_fn=reward_fn, gold_reward_fn=gold_reward_fn)

    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    metrics_path = out / cfg.run.metrics_file
    start = 0
    last = latest_checkpoint(ckpt_root) if cfg.run.resume else None
    if last is not None:
        ck = load_checkpoint(last)
        check_resume_config(ck.config, config_to_dict(cfg), last, config_to_dict(PPOConfig()))
        check_resume_inputs(ck.trainer_state.get("inputs"), inputs, last)
        if ck.step > cfg.steps:
            raise ValueError(f"steps: {str(last)!r} is a checkpoint after {ck.step} steps, more than steps="
                             f"{cfg.steps}; resume with more steps, or use another output_dir or run.resume=false")
        copy_params_(trainer.params, ck.params, str(last))
        trainer.optimizer.load_state_dict(ck.optimizer_state)
        trainer.load_trainer_state(ck.trainer_state)
        restore_rng(ck.rng_meta, ck.rng_tensors)
        start = ck.step
    history = _read_metrics(metrics_path, start) if start else []
    # Rewrite the metrics file so it holds exactly the steps before `start` (none on a fresh run).
    tmp = metrics_path.with_name(metrics_path.name + ".tmp")
    with open(tmp, "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, metrics_path)

    schedule = CheckpointSchedule(cfg.run.checkpoint_every, cfg.run.checkpoint_minutes)
    progress = None
    if cfg.run.progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=cfg.steps, initial=start, desc=f"PPO ({cfg.variant})", unit="step")
    try:
        with open(metrics_path, "a") as log:
            for step in range(start, cfg.steps):
                metrics = trainer.step(step)
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                history.append(metrics)
                done = step + 1
                if schedule.due(done) or done == cfg.steps:
                    save_checkpoint(ckpt_root, done, trainer.params, trainer.optimizer, config_to_dict(cfg),
                                    {**trainer.trainer_state(), "inputs": inputs}, keep=cfg.run.keep_checkpoints)
                    schedule.saved()
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(score=f"{metrics['objective/scores']:.3f}",
                                         kl=f"{metrics['objective/kl']:.3f}")
                if callback is not None:
                    callback(done, metrics)
    finally:
        if progress is not None:
            progress.close()
    save_policy(out / "final", models, cfg, {"steps": cfg.steps, "counters": trainer.counters})
    return PPOResult(models, history, dict(trainer.counters), out)


__all__ = ["train_ppo", "PPOTrainer", "PPOResult", "save_policy", "load_policy", "batch_indices", "derived_seed",
           "seed_everything", "peak_memory"]
