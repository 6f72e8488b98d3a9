"""Configuration for Hydra-SFT, PPO and the critic-free estimators (GRPO, ...): dataclasses, the one source of
truth for every setting.

A field's annotation is its type (`Literal[...]` for choices); `setting(default, help, ge=..., ...)` holds its
default, one-line help and constraints. One generic check over the type hints enforces them (ValueError naming the
dotted field), and `settings_help` lists them for `--help`. Files are JSON or YAML, one mapping per section::

    variant: hydra            # top-level PPOConfig fields
    lora: {r: 8, alpha: 16}
    run: {seed: 1, output_dir: runs/ppo}

Dotted `key=value` pairs override any field (`lora.r=8 top_p=0.9`), read as YAML scalars/lists (`true`, `1e-3`,
`null`, `[q_proj,v_proj]`); string fields take the text as written (`run.output_dir=runs/exp #2`).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import operator
import os
import re
import shutil
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence, TypeVar

import yaml

from hydra_kernels.ops import KL_ESTIMATORS
from hydra_kernels.rlhf.estimators import (ESTIMATORS, GROUPED, KL_PLACEMENTS, LOSS_AGGREGATIONS, SCALE_REWARDS,
                                           SCALINGS, SEQUENCE_LEVEL, preset_settings)

PPO_VARIANTS = ("hydra", "j-hydra", "lora", "full")
REWARD_SOURCES = ("head", "function", "model")
SFT_MODES = ("full", "lora")
DTYPES = ("float32", "bfloat16", "float16")
# Where metrics are reported (rlhf.logging): as transformers' TrainingArguments.report_to.
REPORTERS = ("jsonl", "csv", "tensorboard", "wandb")
# run.parallel: how the processes a launcher started share a run (rlhf.distributed).
PARALLEL = ("none", "ddp", "fsdp2")
INT_MAX = 2 ** 31 - 1        # int settings lie within ±INT_MAX unless they say otherwise: a larger count is a typo
SEED_MAX = 2 ** 64 - 1       # torch.manual_seed's upper limit
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def setting(default, help: str, *, ge=None, gt=None, le=None, lt=None, pattern: str | None = None,
            syntax: str | None = None):
    """A dataclass field with its one-line `help` and constraints: bounds `ge`/`gt`/`le`/`lt` (floats are also
    finite), a regex `pattern` the whole string must match, and `syntax`: the accepted values in words, shown by
    --help and in errors where the type does not say it (needed with `pattern`)."""
    meta = dict(help=help, ge=ge, gt=gt, le=le, lt=lt, pattern=pattern, syntax=syntax)
    meta = {k: v for k, v in meta.items() if v is not None}
    if isinstance(default, list):             # a fresh list per instance (dataclasses refuse a shared one)
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _fail(name: str, msg: str) -> typing.NoReturn:
    raise ValueError(f"{name}: {msg}")


class _Section:
    """What every config dataclass can do: check (and normalise: 2.0 -> 2 for an int) its fields in place."""

    def validate(self, prefix: str = "") -> None:
        """Raises ValueError naming `prefix` + the field that breaks its type or constraints."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            name, tp, value = prefix + f.name, hints[f.name], getattr(self, f.name)
            if dataclasses.is_dataclass(tp):
                if isinstance(value, dict):       # PPOConfig(lora={"r": 8}), over this stage's defaults
                    base = dataclasses.asdict(f.default_factory()) if f.default_factory is not dataclasses.MISSING \
                        else {}
                    value = _from_dict(tp, _merge(base, value), name + ".")
                elif isinstance(value, tp):
                    value.validate(name + ".")
                else:
                    _fail(name, f"must be a {tp.__name__} or a mapping of its fields, got {type(value).__name__}")
            else:
                value = _convert(name, value, tp, f.metadata)
            setattr(self, f.name, value)
        self._relations(prefix)

    def _relations(self, prefix: str) -> None:
        """Constraints between fields (none by default)."""


class _Stage(_Section):
    def __post_init__(self):
        self.validate()


def _convert(name: str, value, tp, meta) -> Any:
    """`value` as type `tp` within the constraints `meta`: an int also from an integral float (2.0), a float from
    an int; nothing else is converted. Raises ValueError naming the field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else _fail(name, "must not be null")
        arms = [a for a in args if a is not type(None)]
        for arm in arms:
            try:
                return _convert(name, value, arm, meta)
            except ValueError:
                if len(arms) == 1:
                    raise
        _fail(name, f"must be {_type_text(tp, meta)}, got {value!r}")
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            _fail(name, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)) or not value:
            _fail(name, f"must be a non-empty list, got {value!r}")
        return [_convert(name, v, args[0], {}) for v in value]
    if tp is bool:
        return value if isinstance(value, bool) else _fail(name, f"must be a bool, got {value!r}")
    if tp is str:
        if not isinstance(value, str) or not value:
            _fail(name, f"must be a non-empty string, got {value!r}")
        if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
            _fail(name, f"must be {meta['syntax']}, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
        elif isinstance(value, float) and value.is_integer():       # not inf, not nan
            value = int(value)
        else:
            _fail(name, f"must be an int, got {value!r}")
        bounds = {"ge": -INT_MAX, "le": INT_MAX} | {k: meta[k] for k in _BOUNDS if k in meta}
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            _fail(name, f"must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:                  # an int beyond float's range
            value = float("inf")
        if not math.isfinite(value):
            _fail(name, f"must be a finite number, got {value!r}")
        bounds = {k: meta[k] for k in _BOUNDS if k in meta}
    else:
        raise TypeError(f"{name}: config fields of type {tp!r} are not supported")
    for key, bound in bounds.items():
        op, sym = _BOUNDS[key]
        if not op(value, bound):
            _fail(name, f"must be {sym} {bound}, got {value!r}")
    return value


def _type_text(tp, meta) -> str:
    """The accepted values of a field in words: `int >= 1`, `float in (0, 1]`, `full | lora`, `str | null`."""
    if "syntax" in meta:
        return meta["syntax"]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_text(a, meta) for a in args)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin is list:
        return f"list of {_type_text(args[0], {})}"
    lo = [k for k in ("ge", "gt") if k in meta]
    hi = [k for k in ("le", "lt") if k in meta]
    if lo and hi:
        left, right = "[" if lo == ["ge"] else "(", "]" if hi == ["le"] else ")"
        return f"{tp.__name__} in {left}{meta[lo[0]]}, {meta[hi[0]]}{right}"
    return " ".join([tp.__name__] + [f"{_BOUNDS[k][1]} {meta[k]}" for k in lo + hi])


# ------------------------------------------------------------------------------------------ sections
@dataclass
class ModelConfig(_Section):
    """Where the model and tokenizer come from (local directories only; nothing is downloaded)."""
    path: str | None = setting(None, "HF model directory (PPO: a Hydra-SFT output); null when passing a model object")
    tokenizer_path: str | None = setting(None, "tokenizer directory; null = model.path")
    dtype: Literal[DTYPES] = setting("float32", "dtype of the parameters")
    activation_checkpointing: bool = setting(False, "recompute decoder-layer activations in backward (trained passes)")
    lean_activations: bool = setting(True, "recompute RMSNorm's fp32 copies and the gated MLP's activation in "
                                           "backward (Llama, Mistral, Qwen2/3): ~20% fewer bytes saved per token, "
                                           "bitwise the same gradients")
    trust_remote_code: bool = setting(False, "run modelling code shipped in the model directory (transformers' "
                                             "trust_remote_code; still local files only)")
    allow_untested: bool = setting(False, "patch an architecture outside the tested list (integrations."
                                          "SUPPORTED_MODEL_TYPES: e.g. gemma, phi); correct when every linear "
                                          "layer is nn.Linear or Conv1D")


@dataclass
class LoRAConfig(_Section):
    """LoRA adapters (HydraLinear). Dropout is not supported: it breaks PPO's ratios."""
    r: int = setting(16, "adapter rank", ge=1)
    alpha: float = setting(32.0, "adapters are scaled by alpha / r", gt=0)
    target_modules: Literal["all-linear"] | list[str] = setting(
        "all-linear", "layers that get adapters: every linear layer, or module-name suffixes as in peft",
        syntax="all-linear or a list of module names, e.g. [q_proj,v_proj]")


@dataclass
class DataConfig(_Section):
    """Inputs and length limits, in tokens. A path is a .jsonl, .json, .parquet or .csv file or a save_to_disk
    directory, in TRL's standard or conversational formats (hydra_kernels.rlhf.data; README "Data formats")."""
    sft_path: str | None = setting(None, "demonstrations: rows of {prompt, completion}, {text} or {messages}")
    preference_path: str | None = setting(None, "preference pairs: rows of {prompt, chosen, rejected} or "
                                                "{chosen, rejected} (implicit prompt)")
    prompt_path: str | None = setting(None, "PPO prompts: rows of {prompt} (other columns are kept)")
    eval_fraction: float = setting(0.1, "share of preference pairs held out for reward accuracy / margin", ge=0, lt=1)
    sft_eval_fraction: float = setting(0.0, "share of demonstrations held out for the SFT eval LM loss "
                                            "(eval/demo_lm_loss)", ge=0, lt=1)
    max_prompt_len: int = setting(128, "longer prompts are cut from the left (the end is kept)", ge=1)
    max_len: int = setting(256, "prompt + completion in SFT; longer ones are cut at the right", ge=1)

    def _relations(self, prefix: str) -> None:
        if self.max_len <= self.max_prompt_len:
            _fail(prefix + "max_len", f"must exceed max_prompt_len ({self.max_prompt_len}), got {self.max_len}")


@dataclass
class RunConfig(_Section):
    """Seeds, output, logging and checkpoints."""
    seed: int = setting(0, "seed of every random draw (data order, adapters, sampling)", ge=0, le=SEED_MAX)
    output_dir: str = setting("runs/hydra-rlhf", "checkpoints, metrics and final/ go here")
    device: str = setting("auto", "auto: cuda if available", pattern=r"auto|cpu|cuda(:[0-9]+)?",
                          syntax="auto, cpu, cuda or cuda:N")
    checkpoint_every: int = setting(0, "steps between checkpoints; 0 = not by count", ge=0)
    checkpoint_minutes: float = setting(30.0, "also checkpoint when this long has passed since the last; 0 = off",
                                        ge=0)
    keep_checkpoints: int = setting(2, "older checkpoints are deleted", ge=1)
    resume: bool = setting(True, "continue from the last checkpoint in output_dir; false: start over, and this "
                                 "run's checkpoints replace the old ones")
    progress: bool = setting(True, "tqdm progress bars (the CLI's --no-progress sets false)")
    parallel: Literal[PARALLEL] | None = setting(
        None, "none: one process; ddp: data parallel over the processes a launcher (torchrun, accelerate launch) "
              "started, batch sizes global (rlhf.distributed); fsdp2: as ddp, with the models sharded over the "
              "processes (FSDP2, integrations.fsdp; 2 processes or more); null = ddp when WORLD_SIZE > 1, else none")
    metrics_file: str = setting("metrics.jsonl", "metrics log, relative to output_dir (and inside it)")
    threads: int | None = setting(None, "torch's CPU threads (torch.set_num_threads, for the whole process); null = "
                                        "1 for a model under 20M parameters on the CPU (faster, and no collapse when "
                                        "another process shares the cores: rlhf.threads), else torch's default",
                                  ge=1, le=4096)
    report_to: Literal[REPORTERS] | list[Literal[REPORTERS]] = setting(
        ["jsonl"], "where metrics go, one or several: jsonl (metrics_file, always written: resume reads it), csv "
                   "(metrics.csv), tensorboard (event files in tensorboard/), wandb (offline unless WANDB_MODE "
                   "says otherwise)", syntax="a name or a list of jsonl, csv, tensorboard, wandb")

    def _relations(self, prefix: str) -> None:
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        self.report_to = list(dict.fromkeys(names))          # a list, in order, each name once


# ------------------------------------------------------------------------------------------- stages
@dataclass
class SFTConfig(_Stage):
    """Hydra-SFT: LM loss on demonstrations (+ chosen responses) + reward_coef · Bradley–Terry loss on pairs."""
    mode: Literal[SFT_MODES] = setting("full", "full: train every weight and both heads; lora: train a LoRA "
                                               "adapter and the heads, then merge the adapter into the base")
    epochs: int = setting(3, "passes over the data", ge=1)
    batch_size: int = setting(16, "examples per step (demonstrations and pairs are batched separately)", ge=1)
    lr: float = setting(1e-4, "learning rate (AdamW)", gt=0)
    head_lr: float | None = setting(None, "reward head's learning rate; null = lr", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    warmup_steps: int = setting(0, "linear warm-up, then constant", ge=0)
    max_grad_norm: float = setting(1.0, "gradients are clipped to this global norm", gt=0)
    reward_coef: float = setting(1.0, "λ in L = L_lm + λ · L_BT", ge=0)
    lm_on_chosen: bool = setting(True, "also apply the LM loss to the chosen response of each pair")
    logging_steps: int = setting(0, "also log the training losses and lr every N optimizer steps; 0 = once per "
                                    "epoch", ge=0)
    eval_steps: int = setting(0, "also evaluate on the held-out pairs and demonstrations every N steps; 0 = at "
                                 "the end of each epoch only", ge=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/hydra-sft"))


UNTRAINED_HEAD_HELP = ("reward_source=head on a reward head Hydra-SFT never trained (sft.json's reward_head_trained "
                       "false: no preference pairs) is refused unless this is true")


@dataclass
class PPOConfig(_Stage):
    """PPO on the SFT model; names follow TRL's PPOConfig where one exists. One step = one rollout of
    `batch_size` prompts, then `ppo_epochs` passes over it in minibatches."""
    variant: Literal[PPO_VARIANTS] = setting(
        "hydra", "hydra: one base, actor + critic adapters, one scoring forward; j-hydra: one shared adapter; "
                 "lora / full: the 4-model LoRA-PPO / full-PPO baselines")
    steps: int = setting(100, "PPO steps (rollouts)", ge=1)
    batch_size: int = setting(16, "prompts per rollout", ge=1)
    mini_batch_size: int = setting(8, "rollouts per optimizer step (must divide batch_size)", ge=1)
    ppo_epochs: int = setting(4, "passes over each rollout", ge=1)
    lr: float = setting(1e-4, "learning rate (AdamW)", gt=0)
    critic_lr: float | None = setting(None, "critic and value head's learning rate; null = lr, 0 freezes them", ge=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "gradients are clipped to this norm", gt=0)
    clip_grad_per_role: bool = setting(False, "clip the actor's and the critic's gradients apart (default: one "
                                              "joint norm)")
    max_new_tokens: int = setting(32, "tokens sampled per response", ge=1)
    temperature: float = setting(1.0, "sampling temperature, also used for the log-probs of scoring and update",
                                 gt=0)
    top_p: float = setting(1.0, "< 1: sampled from the nucleus, but the log-probs are of the full tempered "
                                "distribution (as TRL), so the ratio is not exactly on-policy", gt=0, le=1)
    missing_eos_penalty: float | None = setting(None, "subtracted from the score of responses that never emit EOS",
                                                ge=0)
    compile_rollout: bool = setting(False, "sample with a fixed-size KV cache and a torch.compiled decoding step "
                                           "(CUDA graphs on a GPU); the first rollout compiles")
    reward_source: Literal[REWARD_SOURCES] = setting(
        "head", "head: the Hydra-SFT reward head; function: the reward function(s) passed in (--reward-fn), "
                "weighted by reward_weights; model: the reward model in reward_model")
    reward_weights: list[float] | None = setting(None, "weight of each reward function, in the order given (TRL's "
                                                       "reward_weights); null = 1 each")
    reward_model: str | None = setting(None, "a local AutoModelForSequenceClassification directory (scored with its "
                                             "own tokenizer), for reward_source=model (which the CLI then sets)")
    allow_untrained_reward_head: bool = setting(False, UNTRAINED_HEAD_HELP)
    kl_coef: float = setting(0.05, "β of the KL penalty (initial value when adaptive)", ge=0)
    kl_estimator: Literal[KL_ESTIMATORS] = setting("k1", "per-token KL in the reward (full: exact over the "
                                                         "vocabulary)")
    old_logprobs: Literal["recompute", "rollout"] = setting(
        "recompute", "the update's old log-probs (and entropy): recompute: scored after the rollout; rollout: "
                     "recorded while sampling (as TRL), so scoring skips the actor (j-hydra: its values too)")
    separate_backward: bool = setting(True, "one backward per role where actor and critic run apart (hydra, lora, "
                                            "full): one role's activations alive at a time, the same gradients; "
                                            "false: one backward of the summed loss (TRL's)")
    adaptive_kl: bool = setting(False, "Ziegler et al.'s proportional controller for β")
    kl_target: float = setting(6.0, "nats per sequence the adaptive controller aims for", gt=0)
    kl_horizon: int = setting(10000, "samples over which the controller moves β by up to 20%", ge=1)
    whiten_rewards: bool = setting(False, "whiten per-token rewards over the batch (mean kept), as TRL")
    reward_clip: float | None = setting(None, "clip scores to [-reward_clip, reward_clip] (before the missing-EOS "
                                              "penalty)", gt=0)
    gamma: float = setting(1.0, "discount", ge=0, le=1)
    lam: float = setting(0.95, "GAE λ", ge=0, le=1)
    whiten_advantages: bool = setting(True, "whiten advantages over the batch")
    cliprange: float = setting(0.2, "PPO ratio clip ε", gt=0)
    cliprange_value: float = setting(0.2, "value clip around the rollout's values", gt=0)
    vf_coef: float = setting(0.1, "weight of the value loss", ge=0)
    entropy_coef: float = setting(0.0, "entropy bonus (0 = off)", ge=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/hydra-ppo"))

    def _relations(self, prefix: str) -> None:
        _check_compile_rollout(self)
        if self.batch_size % self.mini_batch_size:
            _fail("mini_batch_size", f"must divide batch_size ({self.batch_size}), got {self.mini_batch_size}")
        _check_reward_settings(self)
        if self.old_logprobs == "rollout" and self.kl_estimator == "full":
            _fail("old_logprobs", "'rollout' records the sampled tokens' log-probs only; kl_estimator 'full' needs "
                                  "the whole distribution (use k1, k2 or k3, or old_logprobs=recompute)")


def _check_compile_rollout(cfg) -> None:
    """A compiled decoding step reads the whole weights outside FSDP2's forward: not with run.parallel=fsdp2."""
    if cfg.compile_rollout and cfg.run.parallel == "fsdp2":
        _fail("compile_rollout", "true is not supported with run.parallel=fsdp2 (the compiled decoding step "
                                 "cannot gather sharded weights); decode eagerly (compile_rollout=false) or use ddp")


def _check_reward_settings(cfg) -> None:
    """reward_model goes with reward_source model, reward_weights with function (None: either, decided later)."""
    src = cfg.reward_source
    if cfg.reward_model is not None and src not in (None, "model"):
        _fail("reward_model", f"is a reward model, but reward_source is {src!r}; drop one of them")
    if src == "model" and cfg.reward_model is None:
        _fail("reward_model", "reward_source 'model' needs a reward model directory (reward_model=DIR)")
    if cfg.reward_weights is not None and src not in (None, "function"):
        _fail("reward_weights", f"weigh reward functions, but reward_source is {src!r}")
    if cfg.reward_weights is not None and cfg.reward_model is not None:
        _fail("reward_weights", "weigh reward functions, but reward_model is given")


@dataclass
class GRPOConfig(_Stage):
    """Critic-free RL (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++) on one base with one adapter; names follow TRL's
    GRPOConfig where one exists. One step = a rollout of `batch_size` completions (batch_size / num_generations
    prompts, each sampled num_generations times), then num_iterations passes over it in minibatches.

    Settings left null take the estimator's preset (rlhf.estimators.PRESETS: e.g. dapo = clip-higher 0.2 / 0.28,
    no KL, token-mean over the batch, zero-std groups dropped, overlong shaping, truncated completions masked);
    a value set explicitly always wins over the preset. `resolved()` gives the values a run uses."""
    estimator: Literal[ESTIMATORS] = setting(
        "grpo", "grpo | dr_grpo | dapo | rloo | reinforce_pp | reinforce_pp_baseline (rlhf.estimators)")
    steps: int = setting(100, "steps (rollouts)", ge=1)
    batch_size: int = setting(16, "completions per rollout (must be divisible by num_generations)", ge=1)
    num_generations: int = setting(8, "G: completions sampled per prompt (a group)", ge=1)
    mini_batch_size: int | None = setting(None, "completions per optimizer step (must divide batch_size); null = "
                                                "batch_size: one optimizer step per pass, as TRL", ge=1)
    num_iterations: int = setting(1, "μ: passes over each rollout (TRL's num_iterations)", ge=1)
    lr: float = setting(1e-5, "learning rate (AdamW)", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "gradients are clipped to this norm", gt=0)
    max_new_tokens: int = setting(256, "tokens sampled per completion (TRL's max_completion_length)", ge=1)
    temperature: float = setting(1.0, "sampling temperature, also used for the log-probs of scoring and update",
                                 gt=0)
    top_p: float = setting(1.0, "< 1: sampled from the nucleus, but the log-probs are of the full tempered "
                                "distribution (as TRL)", gt=0, le=1)
    compile_rollout: bool = setting(False, "sample with a fixed-size KV cache and a torch.compiled decoding step "
                                           "(CUDA graphs on a GPU); the first rollout compiles")
    reward_source: Literal[REWARD_SOURCES] | None = setting(
        None, "function: the reward function(s) (--reward-fn), weighted by reward_weights; model: reward_model; "
              "head: the Hydra-SFT reward head; null = whichever of these is given")
    reward_weights: list[float] | None = setting(None, "weight of each reward function, in the order given (TRL's "
                                                       "reward_weights); null = 1 each")
    reward_model: str | None = setting(None, "a local AutoModelForSequenceClassification directory (scored with its "
                                             "own tokenizer)")
    allow_untrained_reward_head: bool = setting(False, UNTRAINED_HEAD_HELP)
    scale_rewards: Literal[SCALE_REWARDS] | None = setting(
        None, "divide group-centred rewards by the group's std, the batch's, or not (rloo: none | batch, which "
              "whitens its advantages); null = the estimator's")
    loss_agg: Literal[LOSS_AGGREGATIONS] | None = setting(
        None, "seq-mean-token-mean (TRL grpo) | seq-mean-token-sum-norm (Dr. GRPO) | token-mean (DAPO, over the "
              "optimizer batch) | sequence (one ratio per completion, TRL's RLOO); null = the estimator's")
    loss_agg_constant: int | None = setting(None, "the constant of seq-mean-token-sum-norm; null = max_new_tokens",
                                            ge=1)
    cliprange_low: float | None = setting(None, "ε_low: the ratio is clipped below at 1 − ε_low; null = the "
                                                "estimator's (0.2)", gt=0, lt=1)
    cliprange_high: float | None = setting(None, "ε_high: clipped above at 1 + ε_high (DAPO's clip-higher: 0.28); "
                                                 "null = the estimator's", gt=0)
    beta: float | None = setting(None, "β of the KL to the reference (the base stream); null = the estimator's "
                                       "(0 for grpo, dr_grpo, dapo, as TRL)", ge=0)
    kl_in: Literal[KL_PLACEMENTS] | None = setting(None, "where β·KL goes: loss (GRPO) or reward (RLOO, "
                                                         "REINFORCE++); null = the estimator's")
    kl_estimator: Literal[KL_ESTIMATORS] | None = setting(None, "per-token KL estimator (full: exact, in the reward "
                                                                "only); null = the estimator's (k3 in the loss, k1 in "
                                                                "the reward)")
    gamma: float = setting(1.0, "discount of REINFORCE++'s returns-to-go", ge=0, le=1)
    filter_groups: bool | None = setting(None, "drop groups whose rewards are all equal from the loss (DAPO's "
                                               "dynamic sampling, without resampling); null = the estimator's")
    overlong_buffer: int | None = setting(None, "DAPO's soft overlong punishment over the last this many tokens of "
                                                "max_new_tokens (0 = off); null = the estimator's (dapo: a fifth)",
                                          ge=0)
    overlong_penalty: float = setting(1.0, "the punishment's factor (−factor at max_new_tokens)", ge=0)
    mask_truncated: bool | None = setting(None, "completions without EOS take no part in the loss (TRL's "
                                                "mask_truncated_completions); null = the estimator's")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/hydra-grpo"))

    def _relations(self, prefix: str) -> None:
        _check_compile_rollout(self)
        B, G = self.batch_size, self.num_generations
        if B % G:
            _fail("batch_size", f"must be divisible by num_generations ({G}): batch_size counts completions, "
                                f"num_generations per prompt, got batch_size={B}")
        if self.mini_batch_size is not None and B % self.mini_batch_size:
            _fail("mini_batch_size", f"must divide batch_size ({B}), got {self.mini_batch_size}")
        if self.estimator in GROUPED and G < 2:
            _fail("num_generations", f"estimator {self.estimator!r} compares completions of one prompt: needs >= 2, "
                                     f"got {G}")
        _check_reward_settings(self)
        s = self.resolved()
        if s.scale_rewards not in SCALINGS[self.estimator]:
            _fail("scale_rewards", f"estimator {self.estimator!r} takes {' | '.join(SCALINGS[self.estimator])}, "
                                   f"got {s.scale_rewards!r}")
        if s.loss_agg == "sequence" and self.estimator not in SEQUENCE_LEVEL:
            _fail("loss_agg", f"'sequence' needs one advantage per completion; {self.estimator!r} gives one per "
                              f"token")
        if s.kl_in == "loss" and s.kl_estimator == "full" and s.beta > 0:
            _fail("kl_estimator", "'full' is exact over the vocabulary at scoring time: with kl_in=loss use k1, k2 "
                                  "or k3")
        if s.overlong_buffer > self.max_new_tokens:
            _fail("overlong_buffer", f"must be <= max_new_tokens ({self.max_new_tokens}), got {s.overlong_buffer}")

    def resolved(self) -> "EstimatorSettings":
        """The estimator settings this config runs with: each null field takes the estimator's preset
        (estimators.preset_settings), an explicit one is kept; loss_agg_constant defaults to max_new_tokens."""
        preset = preset_settings(self.estimator, self.max_new_tokens)
        pick = {k: (preset[k] if getattr(self, k) is None else getattr(self, k)) for k in preset}
        return EstimatorSettings(**pick, gamma=self.gamma, overlong_penalty=self.overlong_penalty,
                                 loss_agg_constant=self.loss_agg_constant or self.max_new_tokens)


@dataclass(frozen=True)
class EstimatorSettings:
    """The effective estimator settings of a GRPOConfig (GRPOConfig.resolved()); fields as GRPOConfig's."""
    scale_rewards: str
    loss_agg: str
    cliprange_low: float
    cliprange_high: float
    beta: float
    kl_in: str
    kl_estimator: str
    filter_groups: bool
    overlong_buffer: int
    mask_truncated: bool
    gamma: float
    overlong_penalty: float
    loss_agg_constant: int


# ---------------------------------------------------------------------------- loading and overrides
C = TypeVar("C", SFTConfig, PPOConfig, GRPOConfig)


def _from_dict(cls, data, prefix: str):
    """An instance of config class `cls` from nested plain data, checked; unknown keys get a "did you mean"."""
    if not isinstance(data, dict):
        _fail(prefix[:-1] or "config", f"expected a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            _fail(f"{prefix}{key}", f"unknown field of {cls.__name__}" + (f" (did you mean '{prefix}{close[0]}'?)"
                                                                          if close else ""))
    obj = cls(**data)
    if not isinstance(obj, _Stage):           # a stage checks itself on construction
        obj.validate(prefix)
    return obj


def config_from_dict(cls: type[C], data: dict) -> C:
    """Build and validate a config from nested plain data (the inverse of `config_to_dict`)."""
    return _from_dict(cls, data, "")


def config_to_dict(cfg) -> dict:
    """Nested plain data (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def settings(cls) -> list[tuple[str, str, str, str]]:
    """(dotted name, accepted values, default, one-line help) of every setting of config class `cls`, in field
    order, sections flattened with the stage's defaults (SFTConfig's run.output_dir is runs/hydra-sft)."""
    def rows(obj, prefix):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                yield from rows(value, f"{prefix}{f.name}.")
            else:
                shown = json.dumps(value) if not isinstance(value, str) else value
                yield prefix + f.name, _type_text(hints[f.name], f.metadata), shown, f.metadata.get("help", "")
    return list(rows(cls(), ""))


def settings_help(cls, width: int | None = None) -> str:
    """Every setting of `cls` as `name=default  accepted values`, its help below, wrapped to `width` columns
    (default: the terminal's, as argparse)."""
    width = width or max(60, shutil.get_terminal_size().columns - 2)
    lines = ["settings (key=value; shown with their defaults):"]
    for name, accepted, default, help_ in settings(cls):
        lines.append(f"{'  ' + name + '=' + default:<34}  {accepted}")
        lines += textwrap.wrap(help_, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _type_at(cls, parts: Sequence[str]):
    """The annotated type of the dotted field `parts` of config class `cls`, or None if there is none."""
    tp = cls
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _is_text(tp) -> bool:
    """A path, a name or a choice: str, a Literal of strings, either or None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(arms) == 1 and _is_text(arms[0])
    return tp is str or typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))


class _DuplicateKey(Exception):
    """A key given twice in one mapping of a config file (args: the key, and where)."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys, and reading 1e-3 as a float (YAML 1.2; 1.1 wants 1.0e-3)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue                       # refused by SafeLoader itself
            if key in seen:
                raise _DuplicateKey(key, f" (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+.0123456789"))


def _unique_keys(pairs: list) -> dict:
    """json object_pairs_hook: a dict, or _DuplicateKey."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key, "")
        out[key] = value
    return out


def parse_overrides(pairs: Sequence[str], cls: type | None = None) -> dict:
    """["lora.r=8", "top_p=0.9"] -> {"lora": {"r": 8}, "top_p": 0.9}; values parsed as YAML scalars/lists.

    With `cls` (SFTConfig / PPOConfig), a string field (a path, a name) takes the text as written, unless it is
    null / ~ or quoted: as YAML, `runs/exp #2` would be `runs/exp` (a comment), `007` 7 and `yes` True."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override: expected key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ValueError(f"override: bad key in {pair!r}")
        text = raw.strip()
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        if cls is not None and _is_text(_type_at(cls, parts)) and not quoted and text not in ("null", "Null",
                                                                                                "NULL", "~"):
            value = text
        else:
            try:
                value = yaml.load(raw, Loader=_Loader) if text else ""
            except (yaml.YAMLError, _DuplicateKey):
                value = raw                      # not YAML: keep the text (e.g. a path with a colon)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key}: conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def apply_overrides(cfg: C, pairs: Sequence[str]) -> C:
    """A new config with dotted `key=value` overrides applied (and validated)."""
    return config_from_dict(type(cfg), _merge(config_to_dict(cfg), parse_overrides(pairs, type(cfg))))


def read_config_file(path: str | os.PathLike) -> dict:
    """A JSON (.json) or YAML (anything else) file as nested plain data. Raises ValueError naming the file: not
    readable, not UTF-8, not valid, a key given twice in one mapping, or not a mapping at the top."""
    path = os.fspath(path)
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"config: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"config: {path} is not a UTF-8 text file (a {kind} config is expected)") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys) if kind == "JSON" else yaml.load(text, Loader=_Loader)
    except _DuplicateKey as e:
        raise ValueError(f"config: {path}: key {e.args[0]!r} is given twice{e.args[1]}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"config: {path} is not valid {kind}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> C:
    """Defaults < file (JSON/YAML, optional) < dotted overrides. Raises ValueError naming the bad field."""
    data = read_config_file(path) if path is not None else {}
    return config_from_dict(cls, _merge(data, parse_overrides(overrides, cls)))


def recipe_overrides(config_path: str | os.PathLike | None, overrides: Sequence[str], flags: dict,
                     default_output_dir: str) -> list[str]:
    """The overrides a command-line recipe passes to load_config: its flags that were given (`flags`, dotted
    key -> value or None; they win over the --config file) then the user's key=value pairs (which win over
    them), plus run.output_dir=default_output_dir when neither the flags, the file nor a pair sets it."""
    out = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if flags.get("run.output_dir") is None:
        file = read_config_file(config_path) if config_path else {}
        given = parse_overrides(overrides)
        if "output_dir" not in (file.get("run") or {}) and "output_dir" not in (given.get("run") or {}):
            out.append(f"run.output_dir={default_output_dir}")
    return out + list(overrides)


def save_config(cfg, path: str | os.PathLike) -> None:
    """Write the config as JSON (atomically: temp file + rename)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config_to_dict(cfg), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


__all__ = ["ModelConfig", "LoRAConfig", "DataConfig", "RunConfig", "SFTConfig", "PPOConfig", "GRPOConfig",
           "EstimatorSettings", "PPO_VARIANTS", "REWARD_SOURCES", "ESTIMATORS", "REPORTERS",
           "KL_ESTIMATORS", "setting", "settings", "settings_help", "load_config", "apply_overrides",
           "parse_overrides", "config_from_dict", "config_to_dict", "read_config_file", "save_config",
           "recipe_overrides"]
