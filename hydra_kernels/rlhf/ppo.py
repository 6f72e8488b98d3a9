"""PPO: one step reads top to bottom in PPOTrainer.step (rollout → scores → rewards and KL → advantages →
minibatch losses → optimizer steps); the variant's models (rlhf.variants) score and run the forwards, and
train_ppo runs the steps in an rlhf.run.Run (checkpoints, resume, metrics, the final policy).

Determinism: the prompts of step s, the sampling generators (one per row of the step's batch) and the
minibatch order are all derived from (run.seed, s), never from a global RNG, so a run resumed from the
checkpoint after step s continues exactly as the uninterrupted run would (same weights bit for bit on the same
machine and thread count).

Several processes (rlhf.distributed, run.parallel=ddp): batch_size and mini_batch_size are global. Rank r
samples, scores and rewards its block of the step's prompts; then every rank gathers the whole batch, so
whitening, the KL controller, the finite checks and every metric are those of one process. Each rank runs its
block of every minibatch, its loss scaled to its share of the minibatch's response tokens, and the gradients
are summed over ranks: the same update as one process, up to fp32 reduction order. run.parallel=fsdp2 shards
the variant's base copies (models.shardable) over the ranks as well; the step is the same.

Faults: a batch whose rewards or scores are not finite is skipped (warning + counter skipped/nonfinite_reward);
a minibatch whose loss or gradient norm is not finite is not applied (warning + counter skipped/nonfinite_loss).
Weights are therefore never written from NaN, and a checkpoint refuses non-finite weights.
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
from hydra_kernels.integrations.hydra_model import new_reward_head
from hydra_kernels.rlhf import distributed
from hydra_kernels.rlhf.advantages import gae, kl_controller, masked_mean, per_token_rewards, shape_scores, whiten
from hydra_kernels.rlhf.checkpoint import inputs_digest, load_policy, policy_tensors, save_policy
from hydra_kernels.rlhf.config import PPOConfig
from hydra_kernels.rlhf.data import as_prompts, check_tokenizer, encode_prompt, left_pad, report_truncation
from hydra_kernels.rlhf.logging import notice
from hydra_kernels.rlhf.losses import ppo_loss
from hydra_kernels.rlhf.models import ACTOR, CRITIC, PPOModels, resolve_device
from hydra_kernels.rlhf.optim import build_ppo_optimizer, clip_grad_norm_per_role
from hydra_kernels.rlhf.rewards import RewardInputs, build_rewards, call_reward_fn, check_reward_head_trained
from hydra_kernels.rlhf.rollout import Rollout, decode_responses, generate
from hydra_kernels.rlhf.run import Run, derived_seed, peak_memory, row_generators, seed_everything
from hydra_kernels.rlhf.scoring import Scores
from hydra_kernels.rlhf.threads import set_threads
from hydra_kernels.rlhf.variants import build_ppo_models

# (prompts, completions, ended) -> one float each, or TRL's f(prompts, completions, **kwargs) (rlhf.rewards)
RewardFn = Callable[..., Sequence[float]]

# The metrics of TRL's PPOTrainer that every PPO step logs under TRL's own names (README "Metrics" maps the
# rest). eps is a float here (TRL rounds it down to an int).
TRL_METRICS = ("eps", "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
               "loss/value_avg", "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_var",
               "val/num_eos_tokens", "lr", "episode")


@dataclass
class PPOResult:
    """models: the trained variant (models.hydra for hydra / j-hydra); history: the metrics of every step;
    counters: the skipped-batch and skipped-minibatch counts; output_dir: run.output_dir."""
    models: PPOModels
    history: list[dict] = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    output_dir: Path | None = None


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Prompts of `step`: consecutive slices of a fresh permutation per pass over the data (epoch)."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(derived_seed(seed, epoch, 1))
        out.append(int(torch.randperm(n, generator=g)[i]))
    return out


def _finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _global_token_means(loss: torch.Tensor, stats: dict, mask: torch.Tensor, minibatch_mask: torch.Tensor):
    """(this rank's share of the loss, the stats of the whole minibatch): ppo_loss's token means over this
    rank's rows, scaled by their share of the minibatch's response tokens, sum over ranks to the minibatch's
    token means; the stats are summed here, the loss's gradients by the engine."""
    if distributed.world_size() == 1:
        return loss, stats
    share = mask.sum() / minibatch_mask.sum().clamp_min(1)
    return loss * share, distributed.sum_dict({k: v * share for k, v in stats.items()})


class PPOTrainer:
    """The models, optimizer and KL controller of a PPO run; `step(s)` runs PPO step s. `train_ppo` drives it."""

    def __init__(self, models: PPOModels, tokenizer, prompts: Sequence[str], cfg: PPOConfig, *,
                 reward_fn: RewardFn | None = None, gold_reward_fn: RewardFn | None = None,
                 reward_head_trained: bool = True):
        check_tokenizer(tokenizer)
        if not prompts:
            raise ValueError("prompts: need at least one prompt")
        self.models, self.tokenizer, self.prompts, self.cfg = models, tokenizer, list(prompts), cfg
        self.rewards = build_rewards(cfg.reward_source, reward_fn, reward_weights=cfg.reward_weights,
                                     reward_model=cfg.reward_model, device=models.device)
        self.gold_reward_fn = gold_reward_fn
        # False: a fresh head, or one Hydra-SFT never trained (no pairs): its scores are not logged.
        self.reward_head_trained = reward_head_trained
        self.prompt_tokens = [encode_prompt(tokenizer, p, cfg.data.max_prompt_len) for p in self.prompts]
        if any(not t for t in self.prompt_tokens):
            raise ValueError("prompts: an empty prompt with no BOS token gives the model nothing to condition on")
        if models.hydra is not None and models.hydra.tokenizer is None:
            models.hydra.tokenizer = tokenizer      # so hydra.merge(...) writes a directory usable on its own
        distributed.block(cfg.batch_size, "batch_size")           # both split evenly over the processes
        distributed.block(cfg.mini_batch_size, "mini_batch_size")
        distributed.shard(models.shardable(), cfg.run)        # fsdp2: before the optimizer sees the parameters
        self.params = models.named_trainable()
        self.engine = distributed.wrap(list(self.params.values()), cfg.run)
        self.roles = models.roles()
        self.optimizer = build_ppo_optimizer(self.roles, cfg)
        self.kl_ctl = kl_controller(cfg)
        self.counters = {"skipped/nonfinite_reward": 0, "skipped/nonfinite_loss": 0}
        self.device = models.device
        # For eps (episodes per second, as TRL's): this session's first step and how many steps it ran.
        self._session_start: float | None = None
        self._session_steps = 0

    def trainer_state(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict(), "counters": dict(self.counters)}

    def load_trainer_state(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.counters.update(state["counters"])

    def rollout(self, step: int) -> tuple[list[str], Rollout]:
        """This rank's block of the prompts of `step` (all of them in one process) and responses sampled from
        the actor, each row with its own generator (seeded by run.seed, step and its row in the batch) and
        padded to the batch's longest prompt: a row's response does not depend on the number of processes."""
        cfg = self.cfg
        idx = batch_indices(len(self.prompts), cfg.batch_size, cfg.run.seed, step)
        # A compiled rollout pads every batch to the longest prompt of the data set: one shape, one compilation.
        width = max(map(len, self.prompt_tokens if cfg.compile_rollout else [self.prompt_tokens[i] for i in idx]))
        lo, hi = distributed.block(cfg.batch_size)
        ids, mask = left_pad([self.prompt_tokens[i] for i in idx[lo:hi]], self.tokenizer.pad_token_id, width)
        gens = row_generators(cfg.run.seed, step, range(lo, hi), self.device)
        ro = generate(self.models.policy("actor"), ids.to(self.device), mask.to(self.device),
                      max_new_tokens=cfg.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                      pad_token_id=self.tokenizer.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p,
                      generator=gens, compile=cfg.compile_rollout, logprobs=cfg.old_logprobs == "rollout",
                      value_head=self.models.sampled_value_head() if cfg.old_logprobs == "rollout" else None)
        return [self.prompts[i] for i in idx[lo:hi]], ro

    def step(self, step: int) -> dict:
        """PPO step `step` (from 0) on the prompts batch_indices gives it; returns its metrics (TRL's names)."""
        cfg, models, B = self.cfg, self.models, self.cfg.batch_size
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        if self._session_start is None:
            self._session_start = t0
        # 1. Rollout: sample a response to each prompt (of this rank's block) from the actor.
        prompts, ro = self.rollout(step)
        t1 = time.perf_counter()
        # 2. Scores, no grad: old and reference log-probs, per-token KL, entropy, values, reward-head scores (old
        # log-probs and entropy from the rollout with old_logprobs=rollout).
        scores = models.score(ro, temperature=cfg.temperature, kl_estimator=cfg.kl_estimator)
        # 3. The sequence reward from the reward source (rlhf.rewards: the reward head's score, reward functions
        # or a reward model), clipped and less a missing-EOS penalty.
        texts, ended, extra = decode_responses(self.tokenizer, ro), ro.ended.tolist(), {}
        ids = [row[:k] for row, k in zip(ro.response_ids.tolist(), ro.lengths.tolist())]
        inputs = RewardInputs(prompts, texts, ids, ended, head_scores=scores.scores)
        r, per_source = self.rewards(inputs, self.device)
        gold = None if self.gold_reward_fn is None else call_reward_fn(self.gold_reward_fn, inputs)
        # From here on every rank holds the whole batch (the rows of every rank, in rank order).
        ro = distributed.gather_dataclass(ro, {"response_ids": self.tokenizer.pad_token_id})
        scores = distributed.gather_dataclass(scores)
        r, gold = distributed.gather_rows(r), distributed.gather_rows(gold)
        per_source = {k: distributed.gather_rows(v) for k, v in per_source.items()}
        mask = ro.response_mask
        if self.rewards.kind != "head":
            if self.reward_head_trained:
                extra["objective/reward_head"] = scores.scores.mean().item()
            extra.update({f"rewards/{k}/mean": v.nanmean().item() for k, v in per_source.items()})
        r = shape_scores(r, ro.ended, cfg.reward_clip, cfg.missing_eos_penalty)
        if gold is not None:
            extra["objective/gold_reward"] = gold.mean().item()
        t2 = time.perf_counter()
        metrics = {"step": step + 1, "episode": (step + 1) * B, "time/rollout": t1 - t0, "time/score": t2 - t1,
                   **extra}
        if not _finite(r, scores.logprobs, scores.ref_logprobs, scores.kl, scores.values):
            self.counters["skipped/nonfinite_reward"] += 1
            warnings.warn(f"PPO step {step + 1}: non-finite reward or scores; batch skipped "
                          f"({self.counters['skipped/nonfinite_reward']} so far)", RuntimeWarning, stacklevel=2)
            return self._finish({**metrics, **self._summary(ro, scores, r, skipped=True), "time/update": 0.0})

        # 4. Per-token rewards (−β·KL on every response token, the score at the last one), then GAE.
        rewards = per_token_rewards(r, scores.kl, mask, self.kl_ctl.value)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        adv, returns = gae(rewards, scores.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, mask)

        # 5. ppo_epochs passes over the batch in minibatches (order drawn from (seed, step)): loss, step.
        gen = torch.Generator().manual_seed(derived_seed(cfg.run.seed, step, 3))
        params = list(self.params.values())
        sums: dict[str, float] = {}
        ratios: list[float] = []                 # each applied minibatch's mean ratio, for val/ratio_var
        n = 0
        lo, hi = distributed.block(cfg.mini_batch_size)      # this rank's rows of each minibatch
        # One backward per role where the roles run apart: the same gradients, one role's activations alive.
        parts = ((ACTOR,), (CRITIC,)) if cfg.separate_backward and models.separate_roles else ((ACTOR, CRITIC),)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=gen).to(self.device)
            for start in range(0, B, cfg.mini_batch_size):
                idx = order[start:start + cfg.mini_batch_size]
                mine = idx[lo:hi]
                sub = ro.select(mine)
                self.optimizer.zero_grad(set_to_none=True)
                st: dict = {}
                for roles in parts:
                    # The entropy is always asked for: policy/entropy_avg is logged (TRL's), in the loss only with
                    # entropy_coef > 0.
                    logp, ent, values = models.forward(sub, temperature=cfg.temperature, need_entropy=True,
                                                       roles=roles)
                    loss, part = ppo_loss(logp, scores.logprobs[mine], adv[mine], values, scores.values[mine],
                                          returns[mine], sub.response_mask, ent, cliprange=cfg.cliprange,
                                          cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef,
                                          entropy_coef=cfg.entropy_coef)
                    loss, part = _global_token_means(loss, part, sub.response_mask, mask[idx])
                    st = {**st, **part, "loss/total": st.get("loss/total", 0.0) + part["loss/total"]}
                    if not _finite(part["loss/total"]):
                        break
                    loss.backward()
                    del loss, logp, ent, values          # this role's graph and outputs, before the next role's
                if not _finite(st["loss/total"]):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._skip_minibatch(step, "loss")
                    continue
                self.engine.sync_grads()
                if cfg.clip_grad_per_role:
                    norms = clip_grad_norm_per_role(self.roles, cfg.max_grad_norm)
                    st["policy/grad_norm"], st["val/grad_norm"] = norms["actor"], norms["critic"]
                else:
                    st["policy/grad_norm"] = distributed.clip_grad_norm_(params, cfg.max_grad_norm)
                if not all(_finite(v) for k, v in st.items() if k.endswith("/grad_norm")):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._skip_minibatch(step, "gradient norm")
                    continue
                self.optimizer.step()
                n += 1
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                ratios.append(float(st["val/ratio"]))
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()

        # 6. Metrics; the KL controller sees this batch's KL (summed over tokens, mean over sequences), as in
        # Ziegler et al.
        metrics.update(self._summary(ro, scores, r, skipped=False))
        metrics.update({k: v / n for k, v in sums.items()} if n else {})
        if n:
            # Over the minibatches, as TRL's (its var is torch's unbiased one, NaN with one minibatch; this is
            # the population variance, 0 with one).
            metrics["val/ratio_var"] = sum((x - metrics["val/ratio"]) ** 2 for x in ratios) / n
        metrics["time/update"] = t3 - t2
        self.kl_ctl.update(metrics["objective/kl"], B)
        return self._finish(metrics)

    def _summary(self, ro: Rollout, scores: Scores, r: torch.Tensor, skipped: bool) -> dict:
        kl_seq = scores.kl.sum(1)
        non_score = (-self.kl_ctl.value * kl_seq).mean().item()
        return {"objective/kl": kl_seq.mean().item(), "objective/entropy": scores.entropy.sum(1).mean().item(),
                "objective/scores": r.mean().item(), "objective/non_score_reward": non_score,
                "objective/rlhf_reward": r.mean().item() + non_score, "objective/kl_coef": self.kl_ctl.value,
                "val/mean_value": masked_mean(scores.values, ro.response_mask).item(),
                "val/num_eos_tokens": int(((ro.response_ids == self.tokenizer.eos_token_id)
                                           & ro.response_mask.bool()).sum()),
                "env/response_length": ro.lengths.float().mean().item(),
                "env/ended": ro.ended.float().mean().item(), "skipped": skipped}

    def _finish(self, metrics: dict) -> dict:
        self._session_steps += 1
        elapsed = time.perf_counter() - self._session_start
        metrics["eps"] = self._session_steps * self.cfg.batch_size / elapsed if elapsed > 0 else None
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]           # the actor's (TRL: the first group's)
        mib, what = peak_memory(self.device)
        metrics["memory/peak"] = mib
        metrics["memory/peak_source"] = what
        metrics.update(self.counters)
        # Strict JSON: a non-finite statistic (a skipped batch's NaN reward) is written as null.
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}

    def _skip_minibatch(self, step: int, what: str) -> None:
        self.counters["skipped/nonfinite_loss"] += 1
        warnings.warn(f"PPO step {step + 1}: non-finite {what}; minibatch update skipped "
                      f"({self.counters['skipped/nonfinite_loss']} so far)", RuntimeWarning, stacklevel=3)


def train_ppo(model, reward_head, tokenizer, prompts: Sequence[str], cfg: PPOConfig, *,
              reward_fn: RewardFn | None = None, gold_reward_fn: RewardFn | None = None,
              callback: Callable[[int, dict], None] | None = None, reward_head_trained: bool = True) -> PPOResult:
    """Run PPO on the SFT result (`model` + `reward_head`) over `prompts` (strings).

    reward_head None: `model` is a plain causal LM (no Hydra-SFT), trained on reward_fn (reward_source must be
    "function", ValueError otherwise); the value head then starts from a fresh head (drawn from run.seed), as
    a notice on stderr says, and objective/reward_head is not logged.

    hydra / j-hydra patch `model` in place; lora / full keep it as the frozen reference and copy it three
    times. reward_fn(prompts, completions, ended) -> floats (or TRL's f(prompts, completions, **kwargs), or a
    list of them weighted by cfg.reward_weights: rlhf.rewards) is used when cfg.reward_source == "function",
    cfg.reward_model when it is "model"; reward_head_trained: False for a head Hydra-SFT never trained
    (rlhf.sft.read_reward_head_trained), refused with reward_source "head" unless cfg.allow_untrained_reward_head;
    gold_reward_fn (same signatures) is only logged as
    objective/gold_reward. callback(step, metrics) runs after
    every step. Writes <output_dir>/<metrics_file> (one JSON line per step), checkpoints under
    <output_dir>/checkpoints every run.checkpoint_every steps / run.checkpoint_minutes (and at the end), and the
    final policy to <output_dir>/final when the run completes (save_policy). With run.resume, an existing
    checkpoint in <output_dir> is continued (one of a run on another SFT model or other prompts is refused:
    ValueError naming run.output_dir). The global RNGs are seeded with run.seed first (the LoRA A matrices are
    drawn when the model is patched).
    """
    if not isinstance(cfg, PPOConfig):
        raise ValueError(f"cfg: expected a PPOConfig, got {type(cfg).__name__}")
    check_tokenizer(tokenizer)
    check_tokenizer_fits(tokenizer, model)
    if reward_head is None and cfg.reward_source != "function":
        raise ValueError("reward_head: None (a plain model, no Hydra-SFT reward head) needs reward_source="
                         "'function' and a reward_fn")
    check_reward_head_trained(cfg.reward_source, reward_head_trained, cfg.allow_untrained_reward_head)
    prompts = as_prompts(prompts, tokenizer, name="prompts").prompts
    report_truncation(tokenizer, prompts, cfg.data.max_prompt_len, name="prompts")
    # output_dir/final must be free or an earlier PPO result (e.g. not Hydra-SFT's).
    distributed.setup(cfg.run)
    run = Run(cfg, marker="policy.json", foreign=("sft.json",))
    seed_everything(cfg.run.seed)
    device = distributed.local_device(resolve_device(cfg.run.device))
    model.to(device)
    set_threads(cfg.run.threads, device, model)          # run.threads; 1 for a tiny model on the CPU
    fresh_head = reward_head is None
    if fresh_head:
        reward_head = new_reward_head(model, torch.Generator(device=device).manual_seed(
            derived_seed(cfg.run.seed, 0, 6)))
        notice("model: no reward head (a plain model): the value head starts from a fresh head; the reward is "
               "reward_fn's")
    reward_head = reward_head.to(device)
    run.inputs = inputs_digest(modules={"model.path": torch.nn.ModuleList([model, reward_head])},
                               data={"data.prompt_path": list(prompts)})
    models = build_ppo_models(model, reward_head, cfg)
    trainer = PPOTrainer(models, tokenizer, prompts, cfg, reward_fn=reward_fn, gold_reward_fn=gold_reward_fn,
                         reward_head_trained=reward_head_trained and not fresh_head)

    def check_length(ck) -> None:
        if ck.step > cfg.steps:
            raise ValueError(f"steps: {str(ck.path)!r} is a checkpoint after {ck.step} steps, more than steps="
                             f"{cfg.steps}; resume with more steps, or use another output_dir or run.resume=false")

    start, state = run.start(trainer.params, trainer.optimizer, check=check_length)
    if state is not None:
        trainer.load_trainer_state(state)
    with run.logging(run.read_metrics(start), cfg.steps, start, f"PPO ({cfg.variant})"):
        for step in range(start, cfg.steps):
            metrics = trainer.step(step)
            run.log(metrics)
            if run.due(step + 1) or step + 1 == cfg.steps:
                run.checkpoint(step + 1, trainer.params, trainer.optimizer, trainer.trainer_state())
            run.tick(score=metrics["objective/scores"], kl=metrics["objective/kl"])
            if callback is not None:
                callback(step + 1, metrics)
    run.save_final(save_policy, models, cfg, {"steps": cfg.steps, "counters": trainer.counters,
                                              "world_size": run.world_size}, tensors=policy_tensors(models))
    return PPOResult(models, run.history, dict(trainer.counters), run.out)


__all__ = ["train_ppo", "PPOTrainer", "PPOResult", "save_policy", "load_policy", "batch_indices", "TRL_METRICS"]
