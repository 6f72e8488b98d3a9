"""Critic-free RL on one base (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++): one step reads top to bottom in
GRPOTrainer.step (rollout of G completions per prompt → scoring, only what is needed → rewards → advantages →
minibatch losses over num_iterations passes → optimizer steps); the estimators' formulas live in
rlhf.estimators, the models (one adapter, the reference = the base stream) in rlhf.variants.CriticFree, and
train_grpo runs the steps in an rlhf.run.Run (checkpoints, resume, metrics, the final policy).

Determinism and faults as PPO's (rlhf.ppo): prompts, sampling and minibatch order derive from (run.seed, step),
so a resumed run continues bit for bit; a batch with non-finite rewards or scores is skipped
(skipped/nonfinite_reward), a minibatch whose loss or gradient norm is not finite is not applied
(skipped/nonfinite_loss). Metrics carry TRL's GRPOTrainer names (reward, reward_std, frac_reward_zero_std, kl,
entropy, clip_ratio/*, completions/*, num_tokens, loss, grad_norm).

Several processes as PPO's: batch_size and mini_batch_size are global; rank r samples, scores and rewards its
block of the rows, then every rank gathers the whole batch, so groups are whole wherever their rows were
sampled and every group or batch statistic is one process's; each rank's minibatch loss is its share of the
minibatch's (GRPOTrainer._global_minibatch) and the engine sums the gradients.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from hydra_kernels.integrations import check_tokenizer_fits
from hydra_kernels.ops import sampled_kl
from hydra_kernels.rlhf import distributed
from hydra_kernels.rlhf.checkpoint import inputs_digest, policy_tensors, save_policy
from hydra_kernels.rlhf.config import GRPOConfig
from hydra_kernels.rlhf.data import as_prompts, check_tokenizer, encode_prompt, left_pad, report_truncation
from hydra_kernels.rlhf.estimators import (SEQUENCE_LEVEL, aggregate_loss, clipped_token_loss, grpo_advantages,
                                           overlong_penalty, reinforce_pp_advantages, rloo_advantages,
                                           sequence_clipped_loss, token_count, zero_std_groups)
from hydra_kernels.rlhf.models import resolve_device
from hydra_kernels.rlhf.ppo import batch_indices
from hydra_kernels.rlhf.rewards import RewardInputs, Rewards, build_rewards, call_reward_fn, check_reward_head_trained
from hydra_kernels.rlhf.rollout import Rollout, decode_responses, generate
from hydra_kernels.rlhf.run import Run, derived_seed, peak_memory, row_generators, seed_everything
from hydra_kernels.rlhf.threads import set_threads
from hydra_kernels.rlhf.variants import CriticFree, PolicyScores, build_critic_free


@dataclass
class GRPOResult:
    """models: the trained CriticFree (models.hydra.merge("actor", dir) exports the policy); history: the
    metrics of every step; counters: skipped batches and minibatches; output_dir: run.output_dir."""
    models: CriticFree
    history: list[dict] = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    output_dir: Path | None = None


def prompt_records(prompts, tokenizer=None) -> tuple[list[str], dict[str, list]]:
    """(prompt texts, columns) of `prompts` (anything data.as_prompts reads: strings, {"prompt", ...} rows, a
    datasets.Dataset, a PromptData): the texts to generate from and the other fields by name (a dataset's
    columns, passed to TRL-style reward functions). Raises ValueError naming `prompts` for none, a single str, or
    rows whose fields differ."""
    data = as_prompts(prompts, tokenizer, name="prompts")
    if not data.prompts:
        raise ValueError("prompts: need at least one prompt")
    keys = set(data.records[0])
    for i, row in enumerate(data.records):
        if set(row) != keys:
            raise ValueError(f"prompts: row {i} has fields {sorted(row)}, row 0 {sorted(keys)}; every row needs the "
                             f"same fields")
    return data.prompts, {k: [row[k] for row in data.records] for k in sorted(keys - {"prompt"})}


# The minibatch statistics of a step (TRL's names); "kl" too when the KL is in the loss.
LOSS_METRICS = ("loss", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "grad_norm")


def _finite(*tensors) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def _mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


class GRPOTrainer:
    """The models and optimizer of a critic-free run; `step(s)` runs step s. `train_grpo` drives it.

    models: a CriticFree (variants.build_critic_free); prompts: strings or {"prompt", ...} rows; rewards: a
    rewards.Rewards (build_rewards); gold_reward_fn: only logged, as objective/gold_reward."""

    def __init__(self, models: CriticFree, tokenizer, prompts: Sequence, cfg: GRPOConfig, *, rewards: Rewards,
                 gold_reward_fn: Callable | None = None):
        check_tokenizer(tokenizer)
        self.prompts, self.columns = prompt_records(prompts, tokenizer)
        self.models, self.tokenizer, self.cfg, self.rewards = models, tokenizer, cfg, rewards
        self.gold_reward_fn = gold_reward_fn
        self.s = cfg.resolved()
        self.prompt_tokens = [encode_prompt(tokenizer, p, cfg.data.max_prompt_len) for p in self.prompts]
        if any(not t for t in self.prompt_tokens):
            raise ValueError("prompts: an empty prompt with no BOS token gives the model nothing to condition on")
        if models.hydra.tokenizer is None:
            models.hydra.tokenizer = tokenizer
        self.mini_batch_size = cfg.mini_batch_size or cfg.batch_size
        distributed.block(cfg.batch_size, "batch_size")           # both split evenly over the processes
        distributed.block(self.mini_batch_size, "mini_batch_size")
        distributed.shard(models.shardable(), cfg.run)        # fsdp2: before the optimizer sees the parameters
        self.params = models.named_trainable()
        self.engine = distributed.wrap(list(self.params.values()), cfg.run)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.counters = {"skipped/nonfinite_reward": 0, "skipped/nonfinite_loss": 0}
        self.num_tokens = 0
        self.device = models.device
        # What the scoring pass must supply. Old log-probs: only when the policy moves before a minibatch is
        # used (μ > 1 or several optimizer steps per rollout), or when the KL goes into the reward (it is needed
        # before the update); otherwise they are the detached current ones (TRL's num_iterations = 1 shortcut).
        kl_on = self.s.beta > 0
        self.need_old = cfg.num_iterations * (cfg.batch_size // self.mini_batch_size) > 1 or \
            (kl_on and self.s.kl_in == "reward")
        self.need_ref = kl_on
        # Streams for β > 0, μ = 1 with the KL in the loss: the base stream alone. The KL term's gradient needs the
        # current log-probs, which the update forward computes anyway, so scoring only supplies the reference's;
        # adding the actor stream there would double the no-grad forward for old log-probs that are never read,
        # and moving the base stream into the update forward would carry its rows through autograd (saved
        # activations, and a backward through every layer for rows that train nothing).

    def trainer_state(self) -> dict:
        return {"counters": dict(self.counters), "num_tokens": self.num_tokens}

    def load_trainer_state(self, state: dict) -> None:
        self.counters.update(state["counters"])
        self.num_tokens = int(state["num_tokens"])

    def rollout(self, step: int) -> tuple[list[int], Rollout]:
        """The prompt index of every row of this rank's block (all rows in one process) of the step's batch
        (batch_size / G prompts of `step`, each repeated G times: rows g·G … g·G + G − 1 are one group) and the
        completions sampled from the actor, each row with its own generator (seeded by run.seed, step and its
        row) and padded to the batch's longest prompt: a row's completion does not depend on the world size."""
        cfg, G = self.cfg, self.cfg.num_generations
        idx = [i for i in batch_indices(len(self.prompts), cfg.batch_size // G, cfg.run.seed, step)
               for _ in range(G)]
        width = max(len(self.prompt_tokens[i]) for i in (range(len(self.prompts)) if cfg.compile_rollout else idx))
        lo, hi = distributed.block(cfg.batch_size)
        ids, mask = left_pad([self.prompt_tokens[i] for i in idx[lo:hi]], self.tokenizer.pad_token_id, width)
        gens = row_generators(cfg.run.seed, step, range(lo, hi), self.device)
        ro = generate(self.models.policy("actor"), ids.to(self.device), mask.to(self.device),
                      max_new_tokens=cfg.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                      pad_token_id=self.tokenizer.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p,
                      generator=gens, compile=cfg.compile_rollout)
        return idx[lo:hi], ro

    def score(self, ro: Rollout) -> PolicyScores | None:
        """The no-grad scoring pass, only what this configuration needs (None: nothing)."""
        if not (self.need_old or self.need_ref or self.rewards.needs_head):
            return None
        return self.models.score_policies(ro, actor=self.need_old, reference=self.need_ref,
                                          reward=self.rewards.needs_head, temperature=self.cfg.temperature,
                                          kl_estimator=self.s.kl_estimator)

    def step(self, step: int) -> dict:
        """Step `step` (from 0); returns its metrics (TRL's GRPOTrainer names)."""
        cfg, s, B, G = self.cfg, self.s, self.cfg.batch_size, self.cfg.num_generations
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        # 1. Rollout: G completions of each of the step's batch_size / G prompts (this rank's block of them).
        idx, ro = self.rollout(step)
        t1 = time.perf_counter()
        # 2. Scoring, no grad, one forward of only the streams needed (CriticFree.score_policies).
        scores = self.score(ro) or PolicyScores()
        # 3. Rewards: the source's (functions, reward model or reward head), DAPO's overlong shaping, and −β·KL
        #    summed over the completion when the KL goes into a sequence-level reward.
        r_src, per_source, inputs = self._rewards(idx, ro, scores)
        gold = None if self.gold_reward_fn is None else call_reward_fn(self.gold_reward_fn, inputs)
        # From here on every rank holds the whole batch (whole groups: group statistics are one process's).
        ro = distributed.gather_dataclass(ro, {"response_ids": self.tokenizer.pad_token_id})
        scores = distributed.gather_dataclass(scores)
        r_src, gold = distributed.gather_rows(r_src), distributed.gather_rows(gold)
        per_source = {k: distributed.gather_rows(v) for k, v in per_source.items()}
        mask, lengths = ro.response_mask, ro.lengths
        r = r_src + overlong_penalty(lengths, cfg.max_new_tokens, s.overlong_buffer, s.overlong_penalty).to(r_src)
        kl_in_reward = s.beta > 0 and s.kl_in == "reward"
        seq_r = r - s.beta * scores.kl.sum(1) if kl_in_reward and cfg.estimator in SEQUENCE_LEVEL else r
        t2 = time.perf_counter()
        self.num_tokens += int(ro.attention_mask.sum())
        metrics = {"step": step + 1, "episode": (step + 1) * B, "time/rollout": t1 - t0, "time/score": t2 - t1,
                   **self._reward_metrics(r, per_source, ro, gold)}
        if not _finite(seq_r, scores.logprobs, scores.ref_logprobs, scores.kl):
            self.counters["skipped/nonfinite_reward"] += 1
            warnings.warn(f"GRPO step {step + 1}: non-finite reward or scores; batch skipped "
                          f"({self.counters['skipped/nonfinite_reward']} so far)", RuntimeWarning, stacklevel=2)
            return self._finish({**metrics, "skipped": True, "time/update": 0.0})

        # 4. Advantages, and the tokens that carry a loss: truncated completions (mask_truncated) and groups of
        #    equal rewards (filter_groups: DAPO's dynamic sampling, without resampling) take no part.
        zero_std = zero_std_groups(seq_r, G) if G > 1 else torch.zeros(B, dtype=torch.bool, device=r.device)
        keep = torch.ones(B, dtype=torch.bool, device=mask.device)
        if s.mask_truncated:
            keep &= ro.ended
        if s.filter_groups:
            keep &= ~zero_std.to(keep.device)
        loss_mask = mask * keep[:, None].to(mask.dtype)
        if cfg.estimator in ("grpo", "dr_grpo", "dapo"):
            adv = grpo_advantages(seq_r, G, s.scale_rewards)
        elif cfg.estimator == "rloo":
            adv = rloo_advantages(seq_r, G, s.scale_rewards)
        else:
            kl = scores.kl if kl_in_reward else torch.zeros_like(mask, dtype=torch.float32)
            adv = reinforce_pp_advantages(r, kl, mask, s.beta if kl_in_reward else 0.0, s.gamma,
                                          G if cfg.estimator == "reinforce_pp_baseline" else None, loss_mask)
        metrics["frac_reward_zero_std"] = zero_std.float().view(-1, G)[:, 0].mean().item()
        if kl_in_reward:
            metrics["kl"] = _mean(scores.kl, mask).item()

        # 5. num_iterations passes over the rollout in minibatches (order drawn from (seed, step)): loss, step.
        gen = torch.Generator().manual_seed(derived_seed(cfg.run.seed, step, 3))
        params = list(self.params.values())
        sums: dict[str, float] = {}
        n = 0
        lo, hi = distributed.block(self.mini_batch_size)     # this rank's rows of each minibatch
        for _ in range(cfg.num_iterations):
            order = torch.randperm(B, generator=gen).to(self.device)
            for start in range(0, B, self.mini_batch_size):
                rows = order[start:start + self.mini_batch_size]
                lmask = loss_mask[rows]
                if not bool(lmask.any()):
                    continue                               # every completion here is masked: nothing to learn
                mine = rows[lo:hi]
                loss, st = self._loss(ro.select(mine), mine, adv, loss_mask[mine], scores)
                loss, st = self._global_minibatch(loss, st, loss_mask[mine], lmask)
                self.optimizer.zero_grad(set_to_none=True)
                if not _finite(st["loss"]):
                    self._skip_minibatch(step, "loss")
                    continue
                loss.backward()
                self.engine.sync_grads()
                st["grad_norm"] = distributed.clip_grad_norm_(params, cfg.max_grad_norm)
                if not _finite(st["grad_norm"]):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._skip_minibatch(step, "gradient norm")
                    continue
                self.optimizer.step()
                n += 1
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()

        # 6. Metrics: the minibatch statistics averaged over the optimizer steps taken (null without any).
        keys = LOSS_METRICS + (("kl",) if s.beta > 0 and s.kl_in == "loss" else ())
        metrics.update({k: sums[k] / n if n else None for k in keys})
        metrics.update({"optimizer_steps": n, "learning_rate": cfg.lr, "skipped": False, "time/update": t3 - t2})
        return self._finish(metrics)

    def _rewards(self, idx: list[int], ro: Rollout, scores: PolicyScores):
        texts, ended = decode_responses(self.tokenizer, ro), ro.ended.tolist()
        ids = [row[:n] for row, n in zip(ro.response_ids.tolist(), ro.lengths.tolist())]
        inputs = RewardInputs([self.prompts[i] for i in idx], texts, ids, ended,
                              {k: [v[i] for i in idx] for k, v in self.columns.items()}, scores.scores)
        r, per = self.rewards(inputs, self.device)
        return r, per, inputs

    def _loss(self, sub: Rollout, rows: torch.Tensor, adv: torch.Tensor, lmask: torch.Tensor,
              scores: PolicyScores) -> tuple[torch.Tensor, dict]:
        """The loss of one minibatch (rows of the rollout) and its statistics (TRL's names)."""
        s = self.s
        logp, ent, _ = self.models.forward(sub, temperature=self.cfg.temperature, need_entropy=True)
        old = scores.logprobs[rows] if self.need_old else logp.detach()
        kl_in_loss = s.beta > 0 and s.kl_in == "loss"
        # k(d), d = log π_ref − log π: the estimator's formula (kernels.kl), differentiated through log π.
        kl = sampled_kl(scores.ref_logprobs[rows] - logp, s.kl_estimator) if kl_in_loss else None
        if s.loss_agg == "sequence":
            loss, st = sequence_clipped_loss(logp, old, adv[rows], lmask, s.cliprange_low, s.cliprange_high)
            if kl is not None:
                loss = loss + s.beta * aggregate_loss(kl, lmask, "seq-mean-token-mean")
            # Over the rows with tokens (a rank's block of a minibatch may have none: then 0, not NaN).
            has = lmask.any(1).float()
            clip = {k: (st[k].float() * has).sum() / has.sum().clamp_min(1) for k in ("low_clipped", "high_clipped")}
            clip["region"] = ((st["low_clipped"] | st["high_clipped"]).float() * has).sum() / has.sum().clamp_min(1)
        else:
            per_token, st = clipped_token_loss(logp, old, adv[rows], s.cliprange_low, s.cliprange_high)
            if kl is not None:
                per_token = per_token + s.beta * kl
            loss = aggregate_loss(per_token, lmask, s.loss_agg, s.loss_agg_constant, token_count(lmask))
            clip = {k: _mean(st[k].float(), lmask) for k in ("low_clipped", "high_clipped")}
            clip["region"] = _mean((st["low_clipped"] | st["high_clipped"]).float(), lmask)
        out = {"loss": loss.detach(), "entropy": _mean(ent.detach(), lmask), "clip_ratio/low_mean": clip["low_clipped"],
               "clip_ratio/high_mean": clip["high_clipped"], "clip_ratio/region_mean": clip["region"]}
        if kl is not None:
            out["kl"] = _mean(kl.detach(), lmask)
        return loss, out

    def _global_minibatch(self, loss: torch.Tensor, st: dict, lmask: torch.Tensor, minibatch_lmask: torch.Tensor):
        """(this rank's share of the minibatch loss, the minibatch's statistics): each of _loss's means over
        this rank's rows (lmask) scaled by this rank's share of what it averages over — rows for the
        per-sequence aggregations, loss tokens for token-mean and the token statistics, rows with tokens for
        the sequence loss's clip ratios — so the shares sum over ranks to one process's values; the loss's
        gradients are summed by the engine."""
        if distributed.world_size() == 1:
            return loss, st
        rows = lmask.shape[0] / minibatch_lmask.shape[0]
        tokens = lmask.sum() / minibatch_lmask.sum().clamp_min(1)
        seqs = lmask.any(1).sum() / minibatch_lmask.any(1).sum().clamp_min(1)
        loss_share = tokens if self.s.loss_agg == "token-mean" else rows
        clip_share = seqs if self.s.loss_agg == "sequence" else tokens
        share = {"loss": loss_share, "entropy": tokens, "kl": tokens, "clip_ratio/low_mean": clip_share,
                 "clip_ratio/high_mean": clip_share, "clip_ratio/region_mean": clip_share}
        return loss * loss_share, distributed.sum_dict({k: v * share[k] for k, v in st.items()})

    def _reward_metrics(self, r: torch.Tensor, per_source: dict, ro: Rollout, gold: torch.Tensor | None) -> dict:
        lengths, ended = ro.lengths.float(), ro.ended
        term = lengths[ended]
        out = {"reward": r.mean().item(), "reward_std": r.std().item() if r.numel() > 1 else 0.0}
        for name, v in per_source.items():
            ok = v[~torch.isnan(v)]
            out[f"rewards/{name}/mean"] = ok.mean().item() if ok.numel() else math.nan
            out[f"rewards/{name}/std"] = ok.std().item() if ok.numel() > 1 else math.nan
        out.update({"completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
                    "completions/max_length": lengths.max().item(),
                    "completions/clipped_ratio": 1.0 - ended.float().mean().item(),
                    "completions/mean_terminated_length": term.mean().item() if term.numel() else 0.0,
                    "completions/min_terminated_length": term.min().item() if term.numel() else 0.0,
                    "completions/max_terminated_length": term.max().item() if term.numel() else 0.0,
                    "num_tokens": self.num_tokens})
        if gold is not None:
            out["objective/gold_reward"] = gold.mean().item()
        return out

    def _finish(self, metrics: dict) -> dict:
        mib, what = peak_memory(self.device)
        metrics["memory/peak"] = mib
        metrics["memory/peak_source"] = what
        metrics.update(self.counters)
        # Strict JSON: a non-finite statistic (a skipped batch's NaN reward) is written as null.
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}

    def _skip_minibatch(self, step: int, what: str) -> None:
        self.counters["skipped/nonfinite_loss"] += 1
        warnings.warn(f"GRPO step {step + 1}: non-finite {what}; minibatch update skipped "
                      f"({self.counters['skipped/nonfinite_loss']} so far)", RuntimeWarning, stacklevel=3)


def reward_source(cfg: GRPOConfig, reward_fn, reward_head) -> str:
    """cfg.reward_source, or when null the source that is given: reward functions, else cfg.reward_model, else
    the Hydra-SFT reward head. Raises ValueError (naming reward_fn) when none, or more than one, is given."""
    if cfg.reward_source is not None:
        return cfg.reward_source
    given = [k for k, v in (("function", reward_fn), ("model", cfg.reward_model)) if v]
    if len(given) > 1:
        raise ValueError("reward_fn: both reward functions and reward_model are given; set reward_source to choose")
    if given:
        return given[0]
    if reward_head is not None:
        return "head"
    raise ValueError("reward_fn: no reward: give reward functions (--reward-fn), reward_model=DIR, or a Hydra-SFT "
                     "result with a reward head")


def train_grpo(model, tokenizer, prompts: Sequence, cfg: GRPOConfig, *, reward_fn=None, reward_head=None,
               gold_reward_fn: Callable | None = None,
               callback: Callable[[int, dict], None] | None = None, reward_head_trained: bool = True) -> GRPOResult:
    """Run a critic-free estimator (cfg.estimator) on `model`, a causal LM (a Hydra-SFT result or a plain one),
    patched IN PLACE with the actor adapter (LoRA off = the reference policy), over `prompts` (strings or
    {"prompt", ...} rows; the other fields reach TRL-style reward functions as keywords).

    The reward (rewards.build_rewards): reward_fn, one callable or a list (weighted by cfg.reward_weights), or the
    reward model cfg.reward_model, or reward_head (nn.Linear(D, 1), Hydra-SFT's: read from the base stream of the
    scoring forward); cfg.reward_source picks one, null = whichever is given. reward_head_trained: False for a
    head Hydra-SFT never trained, refused as the reward unless cfg.allow_untrained_reward_head. gold_reward_fn is
    only logged (objective/gold_reward). callback(step, metrics) runs after every step. Writes <output_dir>/<metrics_file>,
    checkpoints/ (resume: bitwise, as train_ppo) and final/ (save_policy). Raises ValueError for a missing or
    contradictory reward, bad prompts, or a checkpoint of another run (naming run.output_dir).
    """
    if not isinstance(cfg, GRPOConfig):
        raise ValueError(f"cfg: expected a GRPOConfig, got {type(cfg).__name__}")
    check_tokenizer(tokenizer)
    check_tokenizer_fits(tokenizer, model)
    prompts = as_prompts(prompts, tokenizer, name="prompts")        # rendered once; the trainer reuses it
    texts, columns = prompt_records(prompts, tokenizer)
    report_truncation(tokenizer, texts, cfg.data.max_prompt_len, name="prompts")
    source = reward_source(cfg, reward_fn, reward_head)
    if source == "head" and reward_head is None:
        raise ValueError("reward_head: reward_source 'head' needs the Hydra-SFT reward head")
    check_reward_head_trained(source, reward_head_trained, cfg.allow_untrained_reward_head)
    distributed.setup(cfg.run)
    run = Run(cfg, marker="policy.json", foreign=("sft.json",))
    seed_everything(cfg.run.seed)
    device = distributed.local_device(resolve_device(cfg.run.device))
    model.to(device)
    set_threads(cfg.run.threads, device, model)          # run.threads; 1 for a tiny model on the CPU
    if reward_head is not None:
        reward_head = reward_head.to(device)
    rewards = build_rewards(source, reward_fn, reward_weights=cfg.reward_weights, reward_model=cfg.reward_model,
                            device=device)
    digest_modules = [model] + ([reward_head] if reward_head is not None else [])
    run.inputs = inputs_digest(modules={"model.path": torch.nn.ModuleList(digest_modules)},
                               data={"data.prompt_path": [texts, columns]})
    models = build_critic_free(model, reward_head, cfg)
    trainer = GRPOTrainer(models, tokenizer, prompts, cfg, rewards=rewards, gold_reward_fn=gold_reward_fn)

    def check_length(ck) -> None:
        if ck.step > cfg.steps:
            raise ValueError(f"steps: {str(ck.path)!r} is a checkpoint after {ck.step} steps, more than steps="
                             f"{cfg.steps}; resume with more steps, or use another output_dir or run.resume=false")

    start, state = run.start(trainer.params, trainer.optimizer, check=check_length)
    if state is not None:
        trainer.load_trainer_state(state)
    with run.logging(run.read_metrics(start), cfg.steps, start, f"critic-free ({cfg.estimator})"):
        for step in range(start, cfg.steps):
            metrics = trainer.step(step)
            run.log(metrics)
            if run.due(step + 1) or step + 1 == cfg.steps:
                run.checkpoint(step + 1, trainer.params, trainer.optimizer, trainer.trainer_state())
            run.tick(reward=metrics["reward"], kl=metrics.get("kl", 0.0))
            if callback is not None:
                callback(step + 1, metrics)
    run.save_final(save_policy, models, cfg, {"steps": cfg.steps, "counters": trainer.counters,
                                              "world_size": run.world_size}, tensors=policy_tensors(models))
    return GRPOResult(models, run.history, dict(trainer.counters), run.out)


__all__ = ["train_grpo", "GRPOTrainer", "GRPOResult", "prompt_records", "reward_source"]
