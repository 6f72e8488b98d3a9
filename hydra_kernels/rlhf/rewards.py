"""Reward sources, one layer for PPO and the critic-free estimators: reward functions (weighted), a reward model
directory, or the Hydra-SFT reward head; and loading a user's function from a `module:function` spec.

A reward function is called one of two ways, chosen from its signature:
  - it accepts **kwargs: TRL's way, f(prompts=..., completions=..., completion_ids=..., ended=..., **columns)
    (columns: the dataset's other fields, one value per completion);
  - else, if it takes three positional arguments: PPO's way, f(prompts, completions, ended);
  - else by the names it declares, among prompts, completions, completion_ids, ended and the columns.
It returns one real number per completion (a list, tuple, 1-d tensor or numpy array); NaN means "not applicable"
(TRL's None), and the weighted sum over functions skips it (a row where every function gave NaN stays NaN, and the
step then skips the batch). Anything else raises ValueError naming the function; an exception raised inside the
user's function propagates unchanged (with a note naming the function, so the CLI shows its traceback rather
than a one-line settings error).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

__all__ = ["load_reward_fn", "RewardInputs", "Rewards", "RewardModel", "call_reward_fn", "reward_values",
           "build_rewards", "reward_fn_name", "raised_by_reward_fn", "check_reward_head_trained"]

KNOWN_ARGS = ("prompts", "completions", "completion_ids", "ended")


def load_reward_fn(spec: str, *, name: str = "spec") -> Callable:
    """The callable a spec names: `package.module:function` (imported from sys.path) or
    `path/to/file.py:function` (the file is loaded as a module of its own).

    name: how errors call the argument (the CLI and the recipes pass "--reward-fn").
    Raises ValueError (naming `name`) for a spec without ":", a missing file, a module that cannot be found, or
    an attribute that is missing or not callable. A module that is found but fails to import a dependency of
    its own raises that error unchanged (the user's code is broken, not the spec).
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{name}: expected module:function or file.py:function, got {spec!r}")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        if not os.path.isfile(mod_name):
            raise ValueError(f"{name}: no such file {mod_name!r}")
        sp = importlib.util.spec_from_file_location("hydra_rlhf_user_reward", mod_name)
        if sp is None or sp.loader is None:
            raise ValueError(f"{name}: cannot load {mod_name!r}")
        module = importlib.util.module_from_spec(sp)
        sp.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name is None or not (mod_name == e.name or mod_name.startswith(e.name + ".")):
                raise                   # the user's module failed to import one of its own dependencies
            raise ValueError(f"{name}: cannot import module {mod_name!r} ({e}); for a file, give "
                             f"path/to/file.py:{fn_name}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{name}: {spec!r} is not a callable")
    return fn


# --------------------------------------------------------------------------------------- calling a function
@dataclass
class RewardInputs:
    """What a reward source sees of one batch of B completions: prompts and completions (text), completion_ids
    (token ids, EOS included where emitted), ended (stopped at EOS), columns (the dataset's other fields, one
    list of B values each) and head_scores ([B], the reward head on the base stream, when the step scored it)."""
    prompts: list
    completions: list
    completion_ids: list
    ended: list
    columns: dict = field(default_factory=dict)
    head_scores: torch.Tensor | None = None


def reward_fn_name(fn) -> str:
    """A reward function's name for errors and metrics (rewards/<name>/mean): its __name__, else its type's."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def _call_style(fn) -> str:
    """"trl" (accepts **kwargs), "ppo" (takes three positional arguments) or "names" (see the module docstring)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):           # a builtin without a signature: the PPO call
        return "ppo"
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return "trl"
    try:
        sig.bind(None, None, None)
        return "ppo"
    except TypeError:
        return "names"


def call_reward_fn(fn: Callable, inputs: RewardInputs) -> torch.Tensor:
    """fn's rewards for `inputs` as a float64 tensor [B] (reward_values), fn called as the module docstring says.

    Raises ValueError naming fn when it returns anything but B real numbers (NaN allowed), or when its
    parameters ask for something the batch does not have; fn's own exceptions propagate unchanged."""
    name = reward_fn_name(fn)
    available = {"prompts": inputs.prompts, "completions": inputs.completions,
                 "completion_ids": inputs.completion_ids, "ended": inputs.ended, **inputs.columns}
    style = _call_style(fn)
    if style == "trl":
        args, kwargs = (), available
    elif style == "ppo":
        args, kwargs = (inputs.prompts, inputs.completions, inputs.ended), {}
    else:
        params = inspect.signature(fn).parameters
        wanted = [p for p in params.values() if p.kind not in (inspect.Parameter.VAR_POSITIONAL,)]
        missing = [p.name for p in wanted if p.name not in available and p.default is inspect.Parameter.empty]
        if missing or any(p.kind is inspect.Parameter.POSITIONAL_ONLY for p in wanted):
            raise ValueError(f"reward_fn: {name} takes {list(params)}; a reward function takes (prompts, "
                             f"completions, ended), or keywords among {sorted(available)} (or **kwargs)")
        args, kwargs = (), {p.name: available[p.name] for p in wanted if p.name in available}
    try:
        out = fn(*args, **kwargs)
    except Exception as e:
        # The same exception, its own traceback; the note tells the CLI it is the user's code, not a setting.
        if hasattr(e, "add_note"):
            e.add_note(f"{NOTE} {name}")
        raise
    return reward_values(out, len(inputs.prompts), name)


NOTE = "raised inside the reward function"


def raised_by_reward_fn(e: BaseException) -> bool:
    """Whether `e` came out of a user's reward function (call_reward_fn marks it), not out of this library."""
    return any(str(n).startswith(NOTE) for n in getattr(e, "__notes__", ()))


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"


def reward_values(out, n: int, name: str = "reward_fn") -> torch.Tensor:
    """`out` (what reward function `name` returned) as a float64 tensor [n], checked: a list, tuple, 1-d tensor
    or numpy array of n real numbers, finite or NaN. Raises ValueError naming `reward_fn` and `name` otherwise
    (a dict, a string, None, nested lists, complex or bool values, inf, the wrong length)."""
    def fail(why: str):
        raise ValueError(f"reward_fn: {name} returned {_describe(out)}; expected a sequence of {n} real numbers "
                         f"(list, tuple, 1-d tensor or numpy array){why}")
    np = sys.modules.get("numpy")
    if torch.is_tensor(out) or (np is not None and isinstance(out, np.ndarray)):
        t = out.detach().cpu() if torch.is_tensor(out) else None
        if t is None:
            if out.dtype.kind not in "iuf":
                fail(f": a numpy array of dtype {out.dtype}")
            t = torch.from_numpy(out.astype("float64"))
        elif t.is_complex() or t.dtype == torch.bool:
            fail(f": a tensor of dtype {t.dtype}")
        if t.dim() != 1:
            fail(f": shape {tuple(t.shape)}")
        values = t.double()
    elif isinstance(out, (list, tuple)):
        vals = []
        for i, v in enumerate(out):
            if torch.is_tensor(v) and v.dim() == 0 and not v.is_complex() and v.dtype != torch.bool:
                v = v.item()
            elif np is not None and isinstance(v, np.generic) and v.dtype.kind in "iuf":
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                fail(f": element {i} is {_describe(v)}")
            vals.append(float(v))
        values = torch.tensor(vals, dtype=torch.float64)
    else:
        fail("")
    if values.shape != (n,):
        fail(f": {values.numel()} values for {n} completions")
    if torch.isinf(values).any():
        fail(f": element {int(torch.isinf(values).nonzero()[0])} is infinite (NaN marks 'not applicable')")
    return values


# ------------------------------------------------------------------------------------------- reward model
class RewardModel:
    """A reward model directory: an AutoModelForSequenceClassification (local files only) and its own
    tokenizer. The text prompt + completion is re-tokenized with that tokenizer (right-padded, no special tokens
    added, as TRL's GRPOTrainer does) and logits[:, 0] is the reward. A tokenizer without a pad token pads with
    its EOS (as TRL). Raises ValueError naming `reward_model` for a directory that does not hold one."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 batch_size: int = 64):
        from transformers import AutoModelForSequenceClassification

        from hydra_kernels.rlhf.models import load_tokenizer
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"reward_model: no such directory: {path!r} (local directories only)")
        self.tokenizer = load_tokenizer(path, "reward_model")
        try:
            kwargs = {"local_files_only": True, **({"dtype": dtype} if dtype is not None else {})}
            model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as e:
            raise ValueError(f"reward_model: cannot load a sequence-classification model from {path!r}: "
                             f"{' '.join(str(e).split())}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(device).eval().requires_grad_(False)
        self.name = os.path.basename(os.path.normpath(path)) or "reward_model"
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """[B] float32 rewards of prompt + completion texts."""
        device = next(self.model.parameters()).device
        out = []
        texts = [p + c for p, c in zip(prompts, completions)]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 padding_side="right", add_special_tokens=False)
            logits = self.model(input_ids=enc["input_ids"].to(device),
                                attention_mask=enc["attention_mask"].to(device)).logits
            out.append(logits[:, 0].float())
        return torch.cat(out)


# --------------------------------------------------------------------------------------------- the layer
class Rewards:
    """One run's reward source. kind "function": `fns` weighted by `weights` (sum over functions, a NaN skipped
    as TRL's nansum; NaN when every function gave NaN); "model": `model` (a RewardModel); "head": the
    RewardInputs' head_scores (the Hydra-SFT reward head on the base stream, from the step's scoring forward).

    Calling it gives (rewards [B] float32 on `device`, {name: [B] float32} per function / model, for the
    rewards/<name>/mean metrics)."""

    def __init__(self, kind: str, fns: Sequence[Callable] = (), weights: Sequence[float] | None = None,
                 model: RewardModel | None = None):
        if kind not in ("function", "model", "head"):
            raise ValueError(f"kind: must be function, model or head, got {kind!r}")
        self.kind, self.fns, self.model = kind, list(fns), model
        if kind == "function":
            if not self.fns:
                raise ValueError("reward_fn: reward_source 'function' needs at least one reward function")
            for fn in self.fns:
                if not callable(fn):
                    raise ValueError(f"reward_fn: expected callables, got {_describe(fn)}")
            if weights is not None and len(weights) != len(self.fns):
                raise ValueError(f"reward_weights: {len(weights)} weights for {len(self.fns)} reward functions")
        elif weights is not None:
            raise ValueError(f"reward_weights: weigh reward functions, but the reward source is {kind!r}")
        if kind == "model" and model is None:
            raise ValueError("reward_model: reward_source 'model' needs a reward model")
        self.weights = [1.0] * len(self.fns) if weights is None else [float(w) for w in weights]
        names = [reward_fn_name(f) for f in self.fns] if kind == "function" else \
            [model.name] if kind == "model" else ["reward_head"]
        # Metric names stay distinct when two functions share a name.
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    @property
    def needs_head(self) -> bool:
        """The step must score the base stream with the reward head."""
        return self.kind == "head"

    def __call__(self, inputs: RewardInputs, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.kind == "head":
            if inputs.head_scores is None:
                raise ValueError("head_scores: reward_source 'head' needs the reward head's scores")
            r = inputs.head_scores.float()
            return r, {self.names[0]: r}
        if self.kind == "model":
            r = self.model(inputs.prompts, inputs.completions).to(device)
            return r, {self.names[0]: r}
        per = torch.stack([call_reward_fn(fn, inputs) for fn in self.fns], 1)            # [B, F] float64
        w = torch.tensor(self.weights, dtype=torch.float64)
        total = (per * w).nansum(1)
        total = torch.where(torch.isnan(per).all(1), torch.full_like(total, math.nan), total)
        return (total.float().to(device), {n: per[:, i].float().to(device) for i, n in enumerate(self.names)})


def build_rewards(source: str, reward_fn=None, *, reward_weights: Sequence[float] | None = None,
                  reward_model: str | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None) -> Rewards:
    """A Rewards for reward_source `source` ("function" | "model" | "head"): reward_fn is one callable or a
    sequence of them (function), reward_model a directory (model). Raises ValueError (naming reward_fn,
    reward_weights or reward_model) when what `source` needs is missing or something it does not use is given."""
    fns = [] if reward_fn is None else list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
    if source != "function" and fns:
        raise ValueError(f"reward_fn: given, but reward_source is {source!r}")
    if source != "model" and reward_model is not None:
        raise ValueError(f"reward_model: given, but reward_source is {source!r}")
    model = RewardModel(reward_model, device, dtype) if source == "model" and reward_model is not None else None
    return Rewards(source, fns, reward_weights, model)


def check_reward_head_trained(source: str, trained: bool, allow: bool) -> None:
    """ValueError naming reward_head when RL would take its reward (source "head") from a reward head Hydra-SFT
    never trained, unless `allow` (the allow_untrained_reward_head setting)."""
    if source == "head" and not trained and not allow:
        raise ValueError("reward_head: Hydra-SFT never trained this reward head (no preference pairs, or "
                         "reward_coef=0): its scores are random. Train SFT with preference pairs "
                         "(data.preference_path), use a reward function (--reward-fn) or reward_model, or set "
                         "allow_untrained_reward_head=true to use it anyway")
