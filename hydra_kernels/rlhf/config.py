"""Configuration for Hydra-SFT and PPO: dataclasses with documented defaults.

Files are JSON or YAML with one mapping per section, e.g.::

    variant: hydra            # top-level PPOConfig fields
    kl_coef: 0.05
    lora: {r: 8, alpha: 16}
    run: {seed: 1, output_dir: runs/ppo}

and the command line overrides any field with dotted `key=value` pairs (`lora.r=8 run.seed=3 top_p=0.9`).
Values are parsed as YAML scalars/lists (`true`, `1e-3`, `null`, `[q_proj,v_proj]`) and converted to the
field's type; string fields (paths, names) take the text as written (`run.output_dir=runs/exp #2`). Every check raises ValueError naming the dotted field.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence, TypeVar

import yaml

from hydra_kernels.ops import KL_ESTIMATORS

PPO_VARIANTS = ("hydra", "j-hydra", "lora", "full")
SFT_MODES = ("full", "lora")
DTYPES = ("float32", "bfloat16", "float16")


def _fail(name: str, msg: str) -> None:
    raise ValueError(f"{name}: {msg}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or (value < 0 if allow_zero else value <= 0):
        _fail(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _optional_str(name: str, value) -> None:
    if value is not None and not isinstance(value, str):
        _fail(name, f"must be a string or null, got {value!r}")


def _in_unit(name: str, value, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value <= 1) \
            or (lo_open and value == 0):
        _fail(name, f"must be in {'(0' if lo_open else '[0'}, 1], got {value!r}")


# ------------------------------------------------------------------------------------------ sections
@dataclass
class ModelConfig:
    """Where the model and tokenizer come from (local directories only; nothing is downloaded)."""
    path: str | None = None             # HF model directory; None when the caller passes a model object
    tokenizer_path: str | None = None   # defaults to `path`
    dtype: str = "float32"              # parameters' dtype: float32 | bfloat16 | float16
    activation_checkpointing: bool = False   # recompute decoder-layer activations in backward (trained passes only)

    def validate(self, prefix: str = "model.") -> None:
        for name in ("path", "tokenizer_path"):
            _optional_str(prefix + name, getattr(self, name))
        if self.dtype not in DTYPES:
            _fail(prefix + "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.activation_checkpointing, bool):
            _fail(prefix + "activation_checkpointing", f"must be a bool, got {self.activation_checkpointing!r}")


@dataclass
class LoRAConfig:
    """LoRA adapters (HydraLinear). alpha / r is the scaling; dropout is not supported (breaks PPO ratios)."""
    r: int = 16
    alpha: float = 32.0
    target_modules: str | list[str] = "all-linear"   # "all-linear" or module-name suffixes, as in peft

    def validate(self, prefix: str = "lora.") -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            _fail(prefix + "r", f"must be a positive int, got {self.r!r}")
        _positive(prefix + "alpha", self.alpha)
        tm = self.target_modules
        if not tm == "all-linear" and not (isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm)):
            _fail(prefix + "target_modules", f"must be 'all-linear' or a non-empty list of module names (on the "
                                             f"command line: {prefix}target_modules=[q_proj,v_proj]), got {tm!r}")


@dataclass
class DataConfig:
    """JSONL inputs (schemas in hydra_kernels.rlhf.data) and length limits, in tokens."""
    sft_path: str | None = None          # {prompt, completion}
    preference_path: str | None = None   # {prompt, chosen, rejected}
    prompt_path: str | None = None       # {prompt}
    eval_fraction: float = 0.1           # share of preference pairs held out for reward accuracy / margin
    max_prompt_len: int = 128            # longer prompts are cut from the left (the end is kept)
    max_len: int = 256                   # prompt + completion in SFT; longer ones are cut at the right

    def validate(self, prefix: str = "data.") -> None:
        if not (isinstance(self.eval_fraction, (int, float)) and 0 <= self.eval_fraction < 1):
            _fail(prefix + "eval_fraction", f"must be in [0, 1), got {self.eval_fraction!r}")
        for name in ("sft_path", "preference_path", "prompt_path"):
            _optional_str(prefix + name, getattr(self, name))
        for name in ("max_prompt_len", "max_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(prefix + name, f"must be a positive int, got {v!r}")
        if self.max_len <= self.max_prompt_len:
            _fail(prefix + "max_len", f"must exceed max_prompt_len ({self.max_prompt_len}), got {self.max_len}")


@dataclass
class RunConfig:
    """Seeds, output, logging and checkpoints."""
    seed: int = 0
    output_dir: str = "runs/hydra-rlhf"      # SFTConfig's default: runs/hydra-sft, PPOConfig's: runs/hydra-ppo
    device: str = "auto"                 # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    checkpoint_every: int = 0            # steps between checkpoints (PPO and SFT); 0 = not by count
    checkpoint_minutes: float = 30.0     # also checkpoint once this long has passed since the last one; 0 = off
    keep_checkpoints: int = 2            # older checkpoints are deleted
    resume: bool = True                  # continue from the last checkpoint in output_dir when one exists;
                                         # false: start over, and this run's checkpoints replace the old ones
    progress: bool = True                # tqdm progress bars
    metrics_file: str = "metrics.jsonl"  # relative to output_dir

    def validate(self, prefix: str = "run.") -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            _fail(prefix + "seed", f"must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            _fail(prefix + "output_dir", f"must be a non-empty path, got {self.output_dir!r}")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            _fail(prefix + "device", f"must be 'auto', 'cpu' or 'cuda[:n]', got {self.device!r}")
        for name in ("checkpoint_every", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                _fail(prefix + name, f"must be an int >= 0, got {v!r}")
        if isinstance(self.checkpoint_minutes, bool) or not isinstance(self.checkpoint_minutes, (int, float)) \
                or not self.checkpoint_minutes >= 0:
            _fail(prefix + "checkpoint_minutes", f"must be a number >= 0, got {self.checkpoint_minutes!r}")
        for name in ("resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                _fail(prefix + name, f"must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.metrics_file, str) or not self.metrics_file:
            _fail(prefix + "metrics_file", f"must be a non-empty file name, got {self.metrics_file!r}")
        if self.keep_checkpoints < 1:
            _fail(prefix + "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")


# ------------------------------------------------------------------------------------------- stages
@dataclass
class SFTConfig:
    """Hydra-SFT: LM loss on demonstrations (+ chosen responses) + reward_coef · Bradley–Terry loss on pairs.

    mode "full" trains every weight of the decoder (and both heads); mode "lora" trains a LoRA adapter and
    the heads, then merges the adapter into the base weights, so that "LoRA off" in PPO is the SFT model.
    """
    mode: str = "full"                   # full | lora
    epochs: int = 3
    batch_size: int = 16                 # examples per step (demonstrations and pairs are batched separately)
    lr: float = 1e-4
    head_lr: float | None = None         # reward head's learning rate; None = lr
    weight_decay: float = 0.0
    warmup_steps: int = 0                # linear warm-up, then constant
    max_grad_norm: float = 1.0
    reward_coef: float = 1.0             # λ in  L = L_lm + λ · L_BT
    lm_on_chosen: bool = True            # also apply the LM loss to the chosen response of each pair
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/hydra-sft"))

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.mode not in SFT_MODES:
            _fail("mode", f"must be one of {SFT_MODES}, got {self.mode!r}")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(name, f"must be a positive int, got {v!r}")
        _positive("lr", self.lr)
        if self.head_lr is not None:
            _positive("head_lr", self.head_lr)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            _fail("warmup_steps", f"must be an int >= 0, got {self.warmup_steps!r}")
        _positive("max_grad_norm", self.max_grad_norm)
        _positive("reward_coef", self.reward_coef, allow_zero=True)
        if not isinstance(self.lm_on_chosen, bool):
            _fail("lm_on_chosen", f"must be a bool, got {self.lm_on_chosen!r}")
        _validate_sections(self)


@dataclass
class PPOConfig:
    """PPO on the SFT model. Names follow TRL's PPOConfig where one exists.

    variant: "hydra"   one base, adapters actor + critic; scoring = one forward with streams (base, actor, critic)
             "j-hydra" one base, one shared adapter; streams (base, actor); values from the actor's hidden states
             "lora"    the LoRA-PPO baseline: 4 models (reference, reward, actor+LoRA, critic+LoRA)
             "full"    the full-PPO baseline: 4 models, actor and critic fully trained (small models only)
    One PPO step = one rollout of `batch_size` prompts, then `ppo_epochs` passes over it in minibatches.
    """
    variant: str = "hydra"
    steps: int = 100                     # PPO steps (rollouts)
    batch_size: int = 16                 # prompts per rollout
    mini_batch_size: int = 8             # rollouts per optimizer step (must divide batch_size)
    ppo_epochs: int = 4
    lr: float = 1e-4
    critic_lr: float | None = None       # critic adapter / weights and value head; None = lr (0 freezes them)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    clip_grad_per_role: bool = False     # clip the actor's and the critic's gradients apart (default: jointly, as TRL)
    # generation
    max_new_tokens: int = 32
    temperature: float = 1.0             # also used for the log-probs of the scoring and update passes
    top_p: float = 1.0                   # < 1: sampled from the nucleus, but PPO's log-probs are of the full
                                         # tempered distribution (as TRL), so the ratio is not exactly on-policy
    missing_eos_penalty: float | None = None   # subtracted from the score of responses that never emit EOS
    compile_rollout: bool = False        # sample with a fixed-size KV cache and a torch.compiled decoding step
                                         # (CUDA graphs on a GPU; prompts padded to the data's longest); the
                                         # first rollout compiles
    # reward shaping
    reward_source: str = "head"          # "head": the learned reward head; "function": the reward_fn passed in
    kl_coef: float = 0.05                # β (initial value when adaptive)
    kl_estimator: str = "k1"             # per-token KL in the reward: k1 | k3 | full (exact over the vocabulary)
    adaptive_kl: bool = False            # Ziegler et al. proportional controller
    kl_target: float = 6.0               # nats per sequence the adaptive controller aims for
    kl_horizon: int = 10000              # samples over which the controller moves β by up to 20%
    whiten_rewards: bool = False         # whiten per-token rewards over the batch (mean kept), as TRL
    reward_clip: float | None = None     # clip scores to [-reward_clip, reward_clip] (before the missing-EOS penalty)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    # losses
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0            # entropy bonus (0 = off)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/hydra-ppo"))

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.variant not in PPO_VARIANTS:
            _fail("variant", f"must be one of {PPO_VARIANTS}, got {self.variant!r}")
        for name in ("steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "kl_horizon"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(name, f"must be a positive int, got {v!r}")
        if self.batch_size % self.mini_batch_size:
            _fail("mini_batch_size", f"must divide batch_size ({self.batch_size}), got {self.mini_batch_size}")
        _positive("lr", self.lr)
        if self.critic_lr is not None:
            _positive("critic_lr", self.critic_lr, allow_zero=True)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _positive("max_grad_norm", self.max_grad_norm)
        if not isinstance(self.clip_grad_per_role, bool):
            _fail("clip_grad_per_role", f"must be a bool, got {self.clip_grad_per_role!r}")
        _positive("temperature", self.temperature)
        _in_unit("top_p", self.top_p, lo_open=True)
        if self.missing_eos_penalty is not None:
            _positive("missing_eos_penalty", self.missing_eos_penalty, allow_zero=True)
        if self.reward_source not in ("head", "function"):
            _fail("reward_source", f"must be 'head' or 'function', got {self.reward_source!r}")
        _positive("kl_coef", self.kl_coef, allow_zero=True)
        if self.kl_estimator not in KL_ESTIMATORS:
            _fail("kl_estimator", f"must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        _positive("kl_target", self.kl_target)
        if self.reward_clip is not None:
            _positive("reward_clip", self.reward_clip)
        for name in ("gamma", "lam"):
            _in_unit(name, getattr(self, name))
        for name in ("cliprange", "cliprange_value"):
            _positive(name, getattr(self, name))
        _positive("vf_coef", self.vf_coef, allow_zero=True)
        _positive("entropy_coef", self.entropy_coef, allow_zero=True)
        for name in ("adaptive_kl", "whiten_rewards", "whiten_advantages"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, f"must be a bool, got {getattr(self, name)!r}")
        _validate_sections(self)


def _with_section_defaults(cls, name: str, data: dict) -> dict:
    """`data` for section `name` of stage config `cls` over that stage's defaults for it (which may differ from the
    section class's own: SFTConfig's run.output_dir is runs/hydra-sft, PPOConfig's runs/hydra-ppo)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is dataclasses.MISSING:
        return data
    return _merge(dataclasses.asdict(f.default_factory()), data)


def _validate_sections(cfg) -> None:
    types_ = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        expected = types_[f.name]
        if isinstance(expected, type) and dataclasses.is_dataclass(expected):
            section = getattr(cfg, f.name)
            if isinstance(section, dict):             # PPOConfig(lora={"r": 8}) is accepted
                section = _from_mapping(expected, _with_section_defaults(type(cfg), f.name, section),
                                        prefix=f.name + ".")
                setattr(cfg, f.name, section)
            if not isinstance(section, expected):
                _fail(f.name, f"must be a {expected.__name__}, got {type(section).__name__}")
            section.validate(f.name + ".")


# ---------------------------------------------------------------------------- loading and overrides
C = TypeVar("C", SFTConfig, PPOConfig)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a parsed JSON/YAML value to the annotated type, or raise ValueError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            _fail(name, "must not be null")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ValueError:
                pass
        _fail(name, f"cannot convert {value!r} to {tp}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):       # a single name where a list is expected
            value = [value]
        if not isinstance(value, (list, tuple)):
            _fail(name, f"must be a list, got {value!r}")
        return [_coerce(name, v, item) for v in value]
    if origin is Literal:
        if value not in typing.get_args(tp):
            _fail(name, f"must be one of {typing.get_args(tp)}, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        _fail(name, f"must be a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            _fail(name, f"must be an int, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            _fail(name, f"must be an int, got {value!r}")
        if not math.isfinite(f) or f != int(f):
            _fail(name, f"must be an int, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            _fail(name, f"must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            _fail(name, f"must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            _fail(name, f"must be a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(name, f"must be a mapping of {tp.__name__} fields, got {value!r}")
        return _from_mapping(tp, value, prefix=name + ".")
    return value


def _from_mapping(cls, data: dict, prefix: str = ""):
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            close = difflib.get_close_matches(str(key), list(types_), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            _fail(f"{prefix}{key}", f"unknown field of {cls.__name__}{hint}")
        tp = types_[key]
        if cls in (SFTConfig, PPOConfig) and isinstance(value, dict) and dataclasses.is_dataclass(tp):
            value = _with_section_defaults(cls, key, value)
        kwargs[key] = _coerce(prefix + key, value, tp)
    if dataclasses.is_dataclass(cls) and cls in (SFTConfig, PPOConfig):
        return cls(**kwargs)                       # validates itself
    obj = cls(**kwargs)
    obj.validate(prefix)
    return obj


def config_from_dict(cls: type[C], data: dict) -> C:
    """Build and validate a config from nested plain data (the inverse of `config_to_dict`)."""
    if not isinstance(data, dict):
        raise ValueError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    return _from_mapping(cls, data)


def config_to_dict(cfg) -> dict:
    """Nested plain data (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def _type_at(cls, parts: Sequence[str]):
    """The annotated type of the dotted field `parts` of config class `cls`, or None if there is none."""
    tp = cls
    for part in parts:
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        tp = _field_types(tp).get(part)
    return tp


def _is_text(tp) -> bool:
    """str or str | None: a path or a name."""
    if tp is str:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {str, type(None)}


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
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"override: bad key in {pair!r}")
        text = raw.strip()
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        if cls is not None and _is_text(_type_at(cls, key.split("."))) and not quoted \
                and text not in ("null", "Null", "NULL", "~"):
            value = text
        else:
            try:
                value = yaml.safe_load(raw) if text else ""
            except yaml.YAMLError:
                value = raw                      # not YAML: keep the text (e.g. a path with a colon)
        node = out
        parts = key.split(".")
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
    """A JSON (.json) or YAML (anything else) file as nested plain data; errors name the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"config: cannot read {path}: {e.strerror}") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"config: {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from None
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


__all__ = ["ModelConfig", "LoRAConfig", "DataConfig", "RunConfig", "SFTConfig", "PPOConfig", "PPO_VARIANTS",
           "KL_ESTIMATORS", "load_config", "apply_overrides", "parse_overrides", "config_from_dict",
           "config_to_dict", "read_config_file", "save_config", "recipe_overrides"]
