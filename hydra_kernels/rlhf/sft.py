"""Hydra-SFT: one causal LM with an LM head and a reward head, trained jointly.

    L = L_lm + reward_coef · L_bt
    L_lm = mean over response tokens of −log π(token)   on demonstrations (and on chosen responses)
    L_bt = mean over pairs of −log σ(r(chosen) − r(rejected)),  r = reward head at the last real token

mode "full": every weight of the model and the reward head train. mode "lora": a LoRA adapter ("sft") and
the reward head train; at the end the adapter is merged into the base weights and the model is unpatched,
so the returned model IS the SFT model (PPO's "LoRA off" must be the SFT policy and reward model, not the
pre-SFT one). Only the prompt/padding tokens are masked out of the LM loss: the response includes its EOS.

Several processes (rlhf.distributed): batch_size is global; rank r runs its block of each step's
demonstrations and pairs, L_lm is normalised by the batch's response-token count and L_bt by its pair count
(over every rank), and the gradients are summed: the step of one process, up to fp32 reduction order. Every
rank evaluates the whole held-out set (the same numbers); rank 0 writes checkpoints, metrics and final/.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hydra_kernels import ops
from hydra_kernels.integrations import (check_tokenizer_fits, decoder_forward, load_causal_lm, merge_adapter_into_base,
                                        patch_model, unpatch_model)
from hydra_kernels.integrations.checkpoint import gathered_copy, load_safetensors
from hydra_kernels.integrations.fsdp import gathered_call, whole
from hydra_kernels.integrations.activation_checkpointing import (disable_activation_checkpointing,
                                                                 enable_activation_checkpointing)
from hydra_kernels.integrations.lean_activations import disable_lean_activations, enable_lean_activations
from hydra_kernels.integrations.hydra_model import hidden_size, lm_head_bias, lm_head_weight, new_reward_head
from hydra_kernels.rlhf import distributed
from hydra_kernels.rlhf.checkpoint import inputs_digest, write_dir_atomically
from hydra_kernels.rlhf.config import SFTConfig, config_to_dict
from hydra_kernels.rlhf.data import (PreferencePair, SFTExample, TokenBatch, as_preference_pairs, as_sft_examples,
                                     check_tokenizer, collate_sequences, encode_prompt, encode_response,
                                     report_truncation)
from hydra_kernels.rlhf.models import resolve_device
from hydra_kernels.rlhf.run import Run, derived_seed, seed_everything
from hydra_kernels.rlhf.scoring import IGNORE_INDEX
from hydra_kernels.rlhf.threads import set_threads

SFT_ADAPTER = "sft"


@dataclass
class SFTResult:
    """model: the causal LM with the SFT result in its base weights (unpatched, eval mode, frozen);
    reward_head: nn.Linear(hidden, 1) in fp32; metrics: the final held-out evaluation; history: the metrics
    records (one per epoch, and those of logging_steps / eval_steps); reward_head_trained: whether the reward
    head learnt anything (False after a run without preference pairs, or with reward_coef=0: its scores are
    those of its random initialisation; recorded in sft.json, and PPO / GRPO refuse to use such a head)."""
    model: nn.Module
    reward_head: nn.Linear
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    output_dir: Path | None = None
    reward_head_trained: bool = True


# --------------------------------------------------------------------------------------------- batches
def _demo_batch(tokenizer, examples: Sequence[SFTExample], cfg: SFTConfig) -> TokenBatch:
    d = cfg.data
    return collate_sequences([encode_prompt(tokenizer, e.prompt, d.max_prompt_len) for e in examples],
                             [encode_response(tokenizer, e.completion) for e in examples],
                             tokenizer.pad_token_id, d.max_len)


def _pair_batch(tokenizer, pairs: Sequence[PreferencePair], cfg: SFTConfig) -> TokenBatch:
    """Chosen rows then rejected rows, left-padded together (one forward for both)."""
    d = cfg.data
    prompts = [encode_prompt(tokenizer, p.prompt, d.max_prompt_len) for p in pairs]
    responses = [encode_response(tokenizer, p.chosen) for p in pairs] + \
                [encode_response(tokenizer, p.rejected) for p in pairs]
    batch = collate_sequences(prompts + prompts, responses, tokenizer.pad_token_id, d.max_len)
    k = len(pairs)
    same = int((batch.input_ids[:k] == batch.input_ids[k:]).all(dim=1).sum())
    if same:
        # Cut at max_len, chosen and rejected can become the same tokens: such a pair teaches the reward head
        # nothing (loss log 2) and counts as wrong in reward accuracy.
        warnings.warn(f"Hydra-SFT: {same} of {k} preference pairs in a batch are identical after truncation to "
                      f"data.max_len={d.max_len}; raise data.max_len", RuntimeWarning, stacklevel=2)
    return batch


def _lm_logprob_sum(model, h: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, int]:
    """(Σ log π(response token), number of response tokens): position t predicts token t + 1."""
    targets = batch.input_ids[:, 1:].masked_fill(batch.loss_mask[:, 1:] == 0, IGNORE_INDEX)
    x = h[:, :-1]
    # The head is read inside the call: under FSDP2 (integrations.fsdp) it is gathered there.
    logp, _, _ = gathered_call(model, lambda: ops.linear_logprobs(
        x.reshape(1, -1, x.shape[-1]), whole(lm_head_weight(model, allow_bias=True)), targets.reshape(-1), kl=None,
        ignore_index=IGNORE_INDEX, bias=whole(lm_head_bias(model))), lm_head=True)
    return logp.sum(), int((targets != IGNORE_INDEX).sum())


def _rewards(reward_head: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    # Left padding puts every row's last real token in the last column.
    return reward_head(h[:, -1].float()).squeeze(-1)


def _wins(r: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Per pair of a _pair_batch: r(chosen) > r(rejected), False for a pair whose two rows are the same tokens
    (their scores differ only by float noise of the batched forward); an equal score is no win either."""
    k = r.shape[0] // 2
    same = ((batch.input_ids[:k] == batch.input_ids[k:]) & (batch.attention_mask[:k] == batch.attention_mask[k:]))
    return (r[:k] > r[k:]) & ~same.all(dim=1)


def _forward(model, batch: TokenBatch) -> torch.Tensor:
    h, _ = decoder_forward(model, batch.input_ids, batch.attention_mask, batch.position_ids)
    return h[0]


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_pairs(model, reward_head: nn.Linear, tokenizer, pairs: Sequence[PreferencePair], cfg: SFTConfig,
                   batch_size: int | None = None) -> dict:
    """On preference pairs: LM loss on the chosen responses (nats/token), reward accuracy (share with
    r_chosen > r_rejected; equal scores and pairs whose chosen and rejected are the same tokens count as wrong)
    and mean margin r_chosen − r_rejected."""
    if not pairs:
        raise ValueError("pairs: need at least one pair to evaluate")
    check_tokenizer(tokenizer)
    was_training = model.training
    model.eval()
    device = reward_head.weight.device
    bs = batch_size or cfg.batch_size
    lp_sum, n_tok, correct, margin = 0.0, 0, 0, 0.0
    try:
        for i in range(0, len(pairs), bs):
            chunk = pairs[i:i + bs]
            batch = _pair_batch(tokenizer, chunk, cfg).to(device)
            h = _forward(model, batch)
            r = _rewards(reward_head, h)
            k = len(chunk)
            d = r[:k] - r[k:]
            correct += int(_wins(r, batch).sum())
            margin += float(d.sum())
            chosen = TokenBatch(*(t[:k] for t in (batch.input_ids, batch.attention_mask, batch.position_ids,
                                                  batch.loss_mask)))
            s, n = _lm_logprob_sum(model, h[:k], chosen)
            lp_sum += float(s)
            n_tok += n
    finally:
        model.train(was_training)
    return {"lm_loss": -lp_sum / max(n_tok, 1), "reward_accuracy": correct / len(pairs),
            "reward_margin": margin / len(pairs)}


@torch.no_grad()
def evaluate_demonstrations(model, tokenizer, demonstrations: Sequence[SFTExample], cfg: SFTConfig,
                            batch_size: int | None = None) -> dict:
    """On demonstrations: {"lm_loss": mean −log π over their completion tokens (EOS included), nats/token},
    in eval mode (the model's mode is restored). batch_size: default cfg.batch_size. ValueError for none."""
    if not demonstrations:
        raise ValueError("demonstrations: need at least one demonstration to evaluate")
    check_tokenizer(tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bs = batch_size or cfg.batch_size
    lp_sum, n_tok = 0.0, 0
    try:
        for i in range(0, len(demonstrations), bs):
            batch = _demo_batch(tokenizer, demonstrations[i:i + bs], cfg).to(device)
            s, n = _lm_logprob_sum(model, _forward(model, batch), batch)
            lp_sum += float(s)
            n_tok += n
    finally:
        model.train(was_training)
    return {"lm_loss": -lp_sum / max(n_tok, 1)}


# ------------------------------------------------------------------------------------------- training
def _split_eval(pairs: list, fraction: float, seed: int, salt: int = 5) -> tuple[list, list]:
    """(train, held out): a share `fraction` of the records drawn with (seed, salt), at least one left to train."""
    if fraction <= 0 or len(pairs) < 2:
        return pairs, []
    g = torch.Generator().manual_seed(derived_seed(seed, 0, salt))
    order = torch.randperm(len(pairs), generator=g).tolist()
    n_eval = min(max(1, int(round(fraction * len(pairs)))), len(pairs) - 1)   # at least one pair left to train on
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def _epoch_order(n: int, seed: int, epoch: int, salt: int) -> list[int]:
    g = torch.Generator().manual_seed(derived_seed(seed, epoch, salt))
    return torch.randperm(n, generator=g).tolist()


def hydra_sft(model, tokenizer, demonstrations: Sequence[SFTExample], pairs: Sequence[PreferencePair],
              cfg: SFTConfig, *, eval_pairs: Sequence[PreferencePair] | None = None,
              eval_demonstrations: Sequence[SFTExample] | None = None,
              callback: Callable[[int, dict], None] | None = None) -> SFTResult:
    """Train `model` (a plain transformers causal LM) with Hydra-SFT; see the module docstring.

    eval_pairs: held-out pairs for reward accuracy / margin / LM loss; None = hold out data.eval_fraction of
    `pairs`. eval_demonstrations: held-out demonstrations for eval/demo_lm_loss; None = hold out
    data.sft_eval_fraction of `demonstrations` (default none). callback(epoch, metrics) after every epoch.
    Writes to <output_dir>/<metrics_file> (and run.report_to) a record per epoch ({"epoch", "step", "lr",
    train/* epoch means, eval/*}), one every `logging_steps` steps ({"step", "epoch" (fractional), "lr",
    train/* means since the last such record}) and one every `eval_steps` steps ({"step", "epoch", eval/*});
    a checkpoint to <output_dir>/checkpoints every run.checkpoint_every
    optimizer-loop STEPS (global over all epochs, skipped non-finite steps included), every
    run.checkpoint_minutes and after the last step (before final/ is written), and the result to
    <output_dir>/final (HF model dir + reward_head.safetensors +
    sft.json, atomically) only when training completes. With run.resume, the latest checkpoint is continued,
    also from the middle of an epoch, to the same result as a run never stopped; a checkpoint of a run on
    another model or other data (same settings) is refused with a ValueError naming run.output_dir.
    With run.parallel=fsdp2 `model` is sharded over the processes for training, and result.model is a new plain
    model with the whole trained weights on every rank (integrations.checkpoint.gathered_copy).
    """
    if not isinstance(cfg, SFTConfig):
        raise ValueError(f"cfg: expected an SFTConfig, got {type(cfg).__name__}")
    check_tokenizer(tokenizer)
    check_tokenizer_fits(tokenizer, model)
    distributed.setup(cfg.run)
    distributed.block(cfg.batch_size, "batch_size")          # the demonstrations split evenly over the processes
    # output_dir/final must be free or an earlier Hydra-SFT result (e.g. not PPO's).
    run = Run(cfg, marker="sft.json", foreign=("policy.json",))
    demonstrations = as_sft_examples(demonstrations, tokenizer, name="demonstrations")
    pairs = as_preference_pairs(pairs, tokenizer, name="pairs")
    if not demonstrations and not pairs:
        raise ValueError("demonstrations: need demonstrations or preference pairs to train on")
    if eval_pairs is None:
        pairs, eval_pairs = _split_eval(pairs, cfg.data.eval_fraction, cfg.run.seed)
    else:
        eval_pairs = as_preference_pairs(eval_pairs, tokenizer, name="eval_pairs")
    if eval_demonstrations is None:
        demonstrations, eval_demos = _split_eval(demonstrations, cfg.data.sft_eval_fraction, cfg.run.seed, salt=9)
    else:
        eval_demos = as_sft_examples(eval_demonstrations, tokenizer, name="eval_demonstrations")
    d = cfg.data
    report_truncation(tokenizer, demonstrations + eval_demos, d.max_prompt_len, d.max_len, name="demonstrations")
    report_truncation(tokenizer, pairs + eval_pairs, d.max_prompt_len, d.max_len, name="pairs")
    run.inputs = inputs_digest(modules={"model.path": model},
                               data={"data.sft_path": demonstrations + eval_demos,
                                     "data.preference_path": pairs + eval_pairs})
    seed_everything(cfg.run.seed)
    device = distributed.local_device(resolve_device(cfg.run.device))
    model.to(device)
    set_threads(cfg.run.threads, device, model)          # run.threads; 1 for a tiny model on the CPU
    head = new_reward_head(model, torch.Generator(device=device).manual_seed(derived_seed(cfg.run.seed, 0, 6)))

    if cfg.mode == "lora":
        patch_model(model, adapters=(SFT_ADAPTER,), r=cfg.lora.r, alpha=cfg.lora.alpha,
                    target_modules=cfg.lora.target_modules, allow_untested=cfg.model.allow_untested)
    else:
        model.requires_grad_(True)
    if cfg.model.lean_activations:
        enable_lean_activations(model)              # bitwise the same; no_grad evaluation runs plain
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model)      # training forwards recompute layers; no_grad evaluation does not
    sharded = distributed.shard([model], cfg.run)     # fsdp2; the head stays whole on every rank
    step_pairs = min(cfg.batch_size, len(pairs))
    if sharded and step_pairs % distributed.world_size():
        # Every rank must run the same forwards (FSDP gathers in each): no rank may be left without pairs.
        raise ValueError(f"batch_size: with run.parallel=fsdp2 the pairs of a step (min(batch_size, {len(pairs)} "
                         f"pairs) = {step_pairs}) must split evenly over the {distributed.world_size()} processes")
    body = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": body, "lr": cfg.lr},
              {"params": list(head.parameters()), "lr": cfg.head_lr or cfg.lr}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = cfg.warmup_steps

    def lr_factor(s: int) -> float:
        return min(1.0, (s + 1) / warm) if warm else 1.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    trainable = body + list(head.parameters())
    engine = distributed.wrap(trainable, cfg.run)

    bs = cfg.batch_size
    steps_per_epoch = math.ceil(max(len(demonstrations), len(pairs)) / bs)
    total = cfg.epochs * steps_per_epoch
    named = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    named.update({f"reward_head.{n}": p for n, p in head.named_parameters()})

    def check_length(ck) -> None:
        saved = ck.trainer_state.get("steps_per_epoch")
        if saved != steps_per_epoch:
            raise ValueError(f"run.output_dir: holds a checkpoint of a run with {saved} steps per epoch,"
                             f" this one has {steps_per_epoch} (other data or batch_size); use "
                             f"another output_dir or run.resume=false")
        if ck.step > total:
            raise ValueError(f"epochs: {str(ck.path)!r} is a checkpoint after {ck.step} steps, more than the "
                             f"{total} of epochs={cfg.epochs} ({steps_per_epoch} per epoch); resume with more "
                             f"epochs, or use another output_dir or run.resume=false")

    # Resume after any step: weights, optimizer, schedule, RNGs, the finished epochs' history and the running
    # sums of the epoch in progress; the data order of an epoch depends only on (seed, epoch), so the run
    # continues as if never stopped.
    start, state = run.start(named, optimizer, check=check_length)
    history, skipped, partial = [], 0, None
    # The running sums since the last logging_steps record (they may span epochs).
    window = {"sums": {"train/lm_loss": 0.0, "train/bt_loss": 0.0, "train/reward_accuracy": 0.0}, "counted": 0}
    if state is not None:
        scheduler.load_state_dict(state["scheduler"])
        # The lr a checkpoint holds is the schedule's at its step, from this run's lr / head_lr (Run.start
        # checked the initial ones): any other value was edited in, and would be used for a step.
        where = str(run.last_resumed / "state.json")
        for i, (g, base) in enumerate(zip(optimizer.param_groups, scheduler.base_lrs)):
            if base != g["initial_lr"]:
                raise ValueError(f"{where!r}: field trainer_state.scheduler.base_lrs[{i}] is {base!r}, this run's "
                                 f"settings give {g['initial_lr']!r}")
            want = g["initial_lr"] * lr_factor(scheduler.last_epoch)
            if not math.isclose(g["lr"], want, rel_tol=1e-12):
                raise ValueError(f"{where!r}: field optimizer.param_groups[{i}].lr is {g['lr']!r}, the schedule "
                                 f"gives {want!r} after {scheduler.last_epoch} steps")
        history, skipped, partial = state["history"], state["skipped"], state["epoch_partial"]
        window = state.get("log_window", window)
    start_epoch, start_s = divmod(start, steps_per_epoch)

    def checkpoint(done: int, epoch_partial: dict | None) -> None:
        """After `done` loop steps when due, and always after the last one: a failed final/ save (a full disk)
        then resumes to the result without a step redone. epoch_partial: the running sums of an unfinished
        epoch (None at its end, when the history holds it)."""
        if done == total or run.due(done):
            run.checkpoint(done, named, optimizer, {"scheduler": scheduler.state_dict(), "history": run.history,
                                                    "skipped": skipped, "steps_per_epoch": steps_per_epoch,
                                                    "epoch_partial": epoch_partial, "log_window": window})

    def means(sums: dict, counted: int) -> dict:
        out = {k: v / max(counted, 1) for k, v in sums.items()}
        if not pairs:
            out.pop("train/reward_accuracy")
        return out

    def evaluation() -> dict:
        """eval/* on the held-out pairs and demonstrations (no RNG drawn: resume stays bitwise)."""
        out = {}
        if eval_pairs:
            out.update({f"eval/{k}": v for k, v in evaluate_pairs(model, head, tokenizer, eval_pairs, cfg).items()})
        if eval_demos:
            out["eval/demo_lm_loss"] = evaluate_demonstrations(model, tokenizer, eval_demos, cfg)["lm_loss"]
        return out

    def step_records(done: int) -> None:
        """The logging_steps / eval_steps records due after `done` loop steps (not at an epoch's end, whose
        record holds both)."""
        rec = {"step": done, "epoch": round(done / steps_per_epoch, 4)}
        if cfg.logging_steps and done % cfg.logging_steps == 0:
            rec.update({"lr": scheduler.get_last_lr()[0], **means(window["sums"], window["counted"]),
                        "skipped/nonfinite_loss": skipped})
            window["sums"] = dict.fromkeys(window["sums"], 0.0)
            window["counted"] = 0
        if cfg.eval_steps and done % cfg.eval_steps == 0 and done % steps_per_epoch:
            rec.update(evaluation())
        if len(rec) > 2:
            run.log(rec)

    def train_step(epoch: int, s: int, demo_order: list[int], pair_order: list[int]):
        """One optimizer step on batch s of the epoch (this rank's block of it): (lm, bt, acc) of the whole
        batch, or None when it was skipped."""
        lp_sum = torch.zeros((), device=device)
        n_tok = 0
        bt_sum = torch.zeros((), device=device)
        correct, n_pairs = 0.0, 0
        if demonstrations:
            idx = [demo_order[(s * bs + j) % len(demonstrations)] for j in range(bs)]
            lo, hi = distributed.block(bs)
            batch = _demo_batch(tokenizer, [demonstrations[i] for i in idx[lo:hi]], cfg).to(device)
            lp, n = _lm_logprob_sum(model, _forward(model, batch), batch)
            lp_sum, n_tok = lp_sum + lp, n_tok + n
        if pairs:
            idx = [pair_order[(s * bs + j) % len(pairs)] for j in range(min(bs, len(pairs)))]
            n_pairs = len(idx)
            lo, hi = distributed.block(n_pairs)          # fewer pairs than processes leave some ranks none
            chunk = [pairs[i] for i in idx[lo:hi]]
            if chunk:
                batch = _pair_batch(tokenizer, chunk, cfg).to(device)
                h = _forward(model, batch)
                r = _rewards(head, h)
                k = len(chunk)
                bt_sum = -F.logsigmoid(r[:k] - r[k:]).sum()
                correct = float(_wins(r.detach(), batch).float().sum())
                if cfg.lm_on_chosen:
                    chosen = TokenBatch(*(t[:k] for t in (batch.input_ids, batch.attention_mask,
                                                          batch.position_ids, batch.loss_mask)))
                    lp, n = _lm_logprob_sum(model, h[:k], chosen)
                    lp_sum, n_tok = lp_sum + lp, n_tok + n
        # Normalised by the whole batch's counts: each rank's loss is its share, the shares sum to the loss.
        n_tok = int(distributed.sum_dict({"tokens": n_tok})["tokens"])
        lm = -lp_sum / max(n_tok, 1)
        bt = bt_sum / max(n_pairs, 1)
        loss = lm + cfg.reward_coef * bt
        total = distributed.sum_dict({"lm": lm, "bt": bt, "correct": correct})
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(total["lm"] + cfg.reward_coef * total["bt"]):
            warnings.warn(f"Hydra-SFT epoch {epoch + 1} step {s + 1}: non-finite loss; step skipped",
                          RuntimeWarning, stacklevel=3)
            return None
        if loss.requires_grad:                           # a rank without rows of this step has no graph
            loss.backward()
        engine.sync_grads()
        norm = distributed.clip_grad_norm_(trainable, cfg.max_grad_norm)
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"Hydra-SFT epoch {epoch + 1} step {s + 1}: non-finite gradient; step skipped",
                          RuntimeWarning, stacklevel=3)
            return None
        optimizer.step()
        scheduler.step()
        acc = float(total["correct"]) / n_pairs if n_pairs else float("nan")
        return float(total["lm"]), float(total["bt"]), acc

    model.train()
    with run.logging(history, total, start, f"Hydra-SFT ({cfg.mode})"):
        for epoch in range(start_epoch, cfg.epochs):
            demo_order = _epoch_order(len(demonstrations), cfg.run.seed, epoch, 7) if demonstrations else []
            pair_order = _epoch_order(len(pairs), cfg.run.seed, epoch, 8) if pairs else []
            first = start_s if epoch == start_epoch else 0
            sums = {"train/lm_loss": 0.0, "train/bt_loss": 0.0, "train/reward_accuracy": 0.0}
            counted = 0
            if first:                                   # resumed in the middle of this epoch
                sums = {k: float(partial["sums"][k]) for k in sums}
                counted = partial["counted"]
            for s in range(first, steps_per_epoch):
                stepped = train_step(epoch, s, demo_order, pair_order)
                if stepped is None:
                    skipped += 1
                    run.tick()
                else:
                    lm, bt, acc = stepped
                    counted += 1
                    window["counted"] += 1
                    for acc_sums in (sums, window["sums"]):
                        acc_sums["train/lm_loss"] += lm
                        acc_sums["train/bt_loss"] += bt
                        acc_sums["train/reward_accuracy"] += acc if pairs else 0.0
                    run.tick(lm=lm, bt=bt)
                done = epoch * steps_per_epoch + s + 1
                step_records(done)
                if s + 1 < steps_per_epoch:
                    checkpoint(done, {"sums": sums, "counted": counted})
            done = (epoch + 1) * steps_per_epoch
            metrics = {"epoch": epoch + 1, "step": done, "lr": scheduler.get_last_lr()[0], **means(sums, counted),
                       "skipped/nonfinite_loss": skipped, **evaluation()}
            run.log(metrics)
            checkpoint((epoch + 1) * steps_per_epoch, None)
            if callback is not None:
                callback(epoch + 1, metrics)

    if sharded:
        # A new plain model of the whole weights on every rank (the adapter folded in), as without FSDP.
        model = gathered_copy(model, SFT_ADAPTER if cfg.mode == "lora" else None).to(device)
    elif cfg.mode == "lora":
        # Fold the adapter into the base, then drop the LoRA layers: the base now IS the SFT model.
        merge_adapter_into_base(model, SFT_ADAPTER)
        unpatch_model(model)
    disable_activation_checkpointing(model)         # the returned model runs plain
    disable_lean_activations(model)
    model.requires_grad_(False)
    head.requires_grad_(False)
    model.eval()
    for name, p in list(model.named_parameters()) + list(head.named_parameters()):
        if not torch.isfinite(p).all():
            raise ValueError(f"model: parameter {name!r} is not finite after SFT; nothing was saved")
    history = run.history
    final = {k: v for k, v in history[-1].items() if k.startswith("eval/")} if history else {}
    result = SFTResult(model, head, final, history, None, reward_head_trained=bool(pairs) and cfg.reward_coef > 0)
    result.output_dir = run.save_final(save_sft, result, tokenizer, cfg)
    return result


# ------------------------------------------------------------------------------------------ save / load
def save_sft(out_dir: str | os.PathLike, result: SFTResult, tokenizer=None, cfg: SFTConfig | None = None) -> Path:
    """An HF model directory (config + safetensors, loadable by AutoModelForCausalLM) plus
    reward_head.safetensors and sft.json, written atomically. Load with `load_sft`."""
    from safetensors.torch import save_file

    def fill(tmp: Path):
        result.model.save_pretrained(str(tmp))          # safetensors: the only format transformers 5 writes
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        save_file({k: v.detach().cpu().contiguous() for k, v in result.reward_head.state_dict().items()},
                  str(tmp / "reward_head.safetensors"))
        meta = {"format": "hydra_kernels.rlhf.sft", "hidden_size": result.reward_head.in_features,
                "metrics": result.metrics, "config": config_to_dict(cfg) if cfg is not None else None,
                "reward_head_trained": bool(result.reward_head_trained), "world_size": distributed.world_size()}
        with open(tmp / "sft.json", "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
    return write_dir_atomically(out_dir, fill, marker="sft.json")


def read_reward_head_trained(path: str | os.PathLike) -> bool:
    """Whether the Hydra-SFT result in `path` trained its reward head (sft.json's reward_head_trained; a result
    written before that was recorded counts as trained). ValueError naming path for an unreadable sft.json."""
    try:
        with open(Path(path) / "sft.json") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"path: {str(path)!r}: sft.json is not readable ({e})") from None
    trained = meta.get("reward_head_trained", True) if isinstance(meta, dict) else None
    if not isinstance(trained, bool):
        raise ValueError(f"path: {str(Path(path) / 'sft.json')!r}: reward_head_trained must be true or false, "
                         f"got {trained!r}")
    return trained


def load_sft(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
             trust_remote_code: bool = False):
    """(model, reward_head) from a directory written by save_sft (local files, safetensors only; trust_remote_code:
    run modelling code shipped in it, model.trust_remote_code)."""
    path = Path(path)
    if not (path / "sft.json").is_file() or not (path / "reward_head.safetensors").is_file():
        raise ValueError(f"path: {str(path)!r} is not a Hydra-SFT directory (sft.json, reward_head.safetensors)")
    model = load_causal_lm(path, name="path", dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
    state, _ = load_safetensors(path / "reward_head.safetensors", name="path")
    d = hidden_size(model)
    if tuple(state.get("weight", torch.empty(0)).shape) != (1, d):
        raise ValueError(f"path: reward_head.safetensors does not hold a [1, {d}] weight for this model")
    head = nn.Linear(d, 1, device=device, dtype=torch.float32)
    head.load_state_dict(state)
    return model, head.requires_grad_(False)


__all__ = ["hydra_sft", "SFTResult", "evaluate_pairs", "evaluate_demonstrations", "save_sft", "load_sft",
           "read_reward_head_trained", "SFT_ADAPTER"]
