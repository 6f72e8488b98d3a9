"""The demo's synthetic task: two-number addition with a programmatic gold reward.

Prompts look like ``"37+48="``; a good completion is the sum's digits followed by EOS (``"85"`` + EOS).

* SFT demonstrations are imperfect: a fraction ``demo_error_rate`` of them is wrong by a small, plausible
  amount (off by one or two, or a forgotten/extra carry, off by ten). A policy that imitates them samples
  wrong answers about that often; that is the gap RLHF closes.
* Preference pairs favour the correct answer over a wrong one (small slips, carry slips, swapped digits,
  a dropped or extra digit), so a reward model trained on them learns correctness.
* ``gold_reward`` scores a completion against the true sum: 1 for the exact answer, partial credit that falls
  with the distance, −1 for garbage or a missing EOS. Training never sees it; it only measures the result.

Prompts held out for evaluation (``eval_prompts``, ``eval_pairs``) never occur in any training file, so the
evaluation measures addition, not memory. Everything is drawn from one seeded generator: same seed, same files.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

_PROMPT = re.compile(r"^\s*(\d+)\+(\d+)=\s*$")


@dataclass
class TaskConfig:
    """Sizes and knobs of the synthetic task (all counts are records)."""

    max_operand: int = 99          # operands drawn from 0..max_operand
    demo_error_rate: float = 0.4   # fraction of SFT demonstrations that are wrong
    carry_error_share: float = 0.5  # of the wrong ones: share of carry slips (±10); the rest are off by 1 or 2
    rejected_slip_share: float = 0.6  # rejected answers that are slips; the rest swap, drop or add a digit
    n_sft: int = 4000              # SFT demonstrations {prompt, completion}
    n_pref: int = 4000             # preference pairs {prompt, chosen, rejected}
    n_ppo: int = 2000              # PPO prompts {prompt}
    n_eval_prompts: int = 256      # held-out prompts (gold-reward evaluation)
    n_eval_pairs: int = 512        # held-out preference pairs (reward-head accuracy)
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.max_operand, int) or self.max_operand < 9:
            raise ValueError(f"max_operand: need an int >= 9, got {self.max_operand!r}")
        for name in ("demo_error_rate", "carry_error_share", "rejected_slip_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: need a fraction in [0, 1], got {getattr(self, name)!r}")
        for name in ("n_sft", "n_pref", "n_ppo", "n_eval_prompts", "n_eval_pairs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: need a positive int, got {v!r}")
        n_all = (self.max_operand + 1) ** 2
        if self.n_eval_prompts > n_all // 4 or self.n_eval_pairs > n_all // 4:
            raise ValueError(f"n_eval_prompts/n_eval_pairs: at most a quarter of the {n_all} possible prompts "
                             f"can be held out, got {self.n_eval_prompts}/{self.n_eval_pairs}")


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}="


def parse_prompt(prompt: str) -> tuple[int, int]:
    """(a, b) of a prompt ``"a+b="``; ValueError naming the argument otherwise."""
    m = _PROMPT.match(prompt)
    if not m:
        raise ValueError(f"prompt: expected 'a+b=', got {prompt!r}")
    return int(m.group(1)), int(m.group(2))


def answer_of(prompt: str) -> int:
    a, b = parse_prompt(prompt)
    return a + b


def gold_reward(prompt: str, completion: str, ended: bool = True) -> float:
    """The programmatic gold reward of `completion` (text, special tokens removed) for `prompt`.

    ended: whether the completion stopped with EOS (a completion cut off at the length limit did not).
    1.0 for the exact sum; 0.5 − 0.05·|error| (floored at 0) for a wrong number, so being close earns a little;
    −1.0 for no EOS, an empty answer, or anything that is not a plain number.
    """
    truth = answer_of(prompt)
    text = completion.strip()
    if not ended or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        return -1.0
    err = abs(int(text) - truth)
    return 1.0 if err == 0 else max(0.0, 0.5 - 0.05 * err)


def is_slip(prompt: str, completion: str) -> bool:
    """Whether `completion` is one of the task's arithmetic slips: a number off by 1, 2 or 10."""
    text = completion.strip()
    return text.isdigit() and abs(int(text) - answer_of(prompt)) in (1, 2, 10)


def _slip(rng: random.Random, a: int, b: int, carry_share: float = 0.5) -> int:
    """A plausible wrong sum: a carry slip (±10) with probability `carry_share`, else off by one or two.
    Never the true sum, never negative."""
    truth = a + b
    carry = (a % 10) + (b % 10) >= 10
    while True:
        kind = rng.random()
        if kind >= carry_share:
            wrong = truth + rng.choice((-2, -1, 1, 2))
        else:       # forgot the carry if there was one, invented one if not
            wrong = truth - 10 if carry else truth + 10
            if rng.random() < 0.3:
                wrong = truth + rng.choice((-10, 10))
        if wrong >= 0 and wrong != truth:
            return wrong


def _rejected(rng: random.Random, a: int, b: int, slip_share: float = 0.6) -> str:
    """A dispreferred completion: a slip (probability `slip_share`), else swapped digits or a dropped / extra
    digit (half and half)."""
    truth = str(a + b)
    other = (1.0 - slip_share) / 2
    while True:
        kind = rng.random()
        if kind < slip_share:
            text = str(_slip(rng, a, b))
        elif kind < slip_share + other and len(truth) > 1:
            text = truth[::-1]
        elif kind < slip_share + 1.5 * other and len(truth) > 1:
            i = rng.randrange(len(truth))
            text = truth[:i] + truth[i + 1:]
        else:
            i = rng.randrange(len(truth) + 1)
            text = truth[:i] + str(rng.randrange(10)) + truth[i:]
        text = text.lstrip("0") or "0"
        if text != truth:
            return text


class ArithmeticTask:
    """Generates the task's datasets (lists of dicts in the JSONL schema of the rlhf loaders)."""

    def __init__(self, config: TaskConfig | None = None):
        self.config = config or TaskConfig()
        c = self.config
        rng = random.Random(c.seed)
        pairs = [(a, b) for a in range(c.max_operand + 1) for b in range(c.max_operand + 1)]
        rng.shuffle(pairs)
        n_held = c.n_eval_prompts + c.n_eval_pairs
        self._eval_prompt_ops = pairs[:c.n_eval_prompts]
        self._eval_pair_ops = pairs[c.n_eval_prompts:n_held]
        self._train_ops = pairs[n_held:]
        self._rng = rng

    @property
    def max_answer_chars(self) -> int:
        return len(str(2 * self.config.max_operand))

    def _train_draw(self, n: int) -> list[tuple[int, int]]:
        return [self._rng.choice(self._train_ops) for _ in range(n)]

    def sft_records(self) -> list[dict]:
        out = []
        for a, b in self._train_draw(self.config.n_sft):
            wrong = self._rng.random() < self.config.demo_error_rate
            text = str(_slip(self._rng, a, b, self.config.carry_error_share) if wrong else a + b)
            out.append({"prompt": prompt_of(a, b), "completion": text})
        return out

    def _pairs(self, ops) -> list[dict]:
        return [{"prompt": prompt_of(a, b), "chosen": str(a + b),
                 "rejected": _rejected(self._rng, a, b, self.config.rejected_slip_share)}
                for a, b in ops]

    def preference_records(self) -> list[dict]:
        return self._pairs(self._train_draw(self.config.n_pref))

    def ppo_records(self) -> list[dict]:
        return [{"prompt": prompt_of(a, b)} for a, b in self._train_draw(self.config.n_ppo)]

    def eval_prompt_records(self) -> list[dict]:
        return [{"prompt": prompt_of(a, b)} for a, b in self._eval_prompt_ops]

    def eval_pair_records(self) -> list[dict]:
        return self._pairs(self._eval_pair_ops)

    def train_operands(self) -> list[tuple[int, int]]:
        """Every (a, b) that training files may use (all but the held-out ones), e.g. for pretraining."""
        return list(self._train_ops)

    def write(self, directory: str | os.PathLike) -> dict[str, str]:
        """Write every split as JSONL (plus task.json with the config); returns {split: path}.

        The order is fixed (sft, pref, ppo, eval) so the files depend only on the seed.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        splits = {
            "sft": self.sft_records(),
            "pref": self.preference_records(),
            "ppo": self.ppo_records(),
            "eval_prompts": self.eval_prompt_records(),
            "eval_pairs": self.eval_pair_records(),
        }
        paths = {}
        for name, records in splits.items():
            paths[name] = str(d / f"{name}.jsonl")
            write_jsonl(paths[name], records)
        (d / "task.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return paths


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def mean_and_stderr(values) -> tuple[float, float]:
    """Sample mean and its standard error (s / sqrt(n)); stderr is 0 for fewer than two values."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("values: need at least one value")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)
