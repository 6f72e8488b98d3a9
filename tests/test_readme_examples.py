"""Every ```python block of README.md runs, on CPU, offline, so the documented examples cannot rot.

The blocks run in README order, with the working directory set to one temporary directory. A block that reads
names from earlier ones (`torch`, `hk`, `targets`) continues their session, in a copy of the namespace the
previous block left; a self-contained block starts from an empty one. The directory holds what the examples
assume exists:

* ``path/to/model``: a tiny Llama and a character tokenizer, built and saved by the demo's own builders
  (hydra_kernels.rlhf.demo.model / .tokenizer), so the README's literal path loads without any text change;
* ``sft.jsonl``, ``pref.jsonl``, ``prompts.jsonl``: a few records each in the loaders' schemas, from the
  demo's task (hydra_kernels.rlhf.demo.task).

Names the README leaves to the reader are injected before a block runs (INJECT). Sizes too slow for CPU CI
are shrunk by the explicit table SHRINK; every entry must occur in README.md exactly once, so the table fails
loudly when the README changes. Each block is its own test and checks what it produced.
"""
from __future__ import annotations

import ast
import builtins
import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MODEL_DIR = "path/to/model"            # the README's placeholder, created relative to the working directory

# Sizes too slow for CPU CI: (README text, replacement). Each must occur in README.md exactly once.
SHRINK = [
    ("steps=100,", "steps=2,"),       # Hydra-RLHF in 20 lines: 100 PPO steps take minutes on CPU
    ("steps=50,", "steps=2,"),        # critic-free RL: 50 DAPO steps
]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.MULTILINE | re.DOTALL)


README_TEXT = README.read_text()
BLOCKS = _python_blocks(README_TEXT)


def _block_id(i: int, code: str) -> str:
    first = next(line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    first = first.split("#")[0]
    return f"{i}-" + re.sub(r"\W+", "_", first).strip("_")[:40]


def _index_of(marker: str) -> int:
    """The index of the one block that contains `marker` (ValueError if not exactly one)."""
    hits = [i for i, code in enumerate(BLOCKS) if marker in code]
    if len(hits) != 1:
        raise ValueError(f"README.md: expected exactly one ```python block containing {marker!r}, found {len(hits)}")
    return hits[0]


# --------------------------------------------------------------------------------------- what examples assume
def _tiny_model_dir(root: Path) -> Path:
    from hydra_kernels.rlhf.demo.model import TinyModelConfig, build_tiny_model, save_model
    from hydra_kernels.rlhf.demo.tokenizer import build_char_tokenizer
    tok = build_char_tokenizer()
    # max_positions covers the HydraModel example's 64 new tokens after the prompt.
    cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=128)
    return Path(save_model(build_tiny_model(tok, cfg, seed=0), tok, root / MODEL_DIR))


def _jsonl_files(root: Path) -> None:
    from hydra_kernels.rlhf.demo.task import ArithmeticTask, TaskConfig, write_jsonl
    task = ArithmeticTask(TaskConfig(n_sft=8, n_pref=8, n_ppo=8, n_eval_prompts=4, n_eval_pairs=4, seed=0))
    write_jsonl(root / "sft.jsonl", task.sft_records())           # {"prompt", "completion"}
    write_jsonl(root / "pref.jsonl", task.preference_records())   # {"prompt", "chosen", "rejected"}
    write_jsonl(root / "prompts.jsonl", task.ppo_records())       # {"prompt"}


def _hydra_model_inputs(root: Path) -> dict:
    """input_ids / attention_mask (a left-padded batch) and prompt_ids / prompt_mask for the HydraModel block."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(root / MODEL_DIR), local_files_only=True)
    full = tok(["12+34=46", "5+6=11", "70+8="], padding=True, return_tensors="pt")
    prompts = tok(["3+4=", "25+17="], padding=True, return_tensors="pt")
    return {"input_ids": full["input_ids"], "attention_mask": full["attention_mask"],
            "prompt_ids": prompts["input_ids"], "prompt_mask": prompts["attention_mask"]}


# Names a block reads but the README never defines: block marker -> builder(root) -> {name: value}.
INJECT = {
    "HydraModel.from_pretrained_base": _hydra_model_inputs,
}


def _free_names(code: str, defined) -> set[str]:
    """Names `code` reads that neither it, `defined` nor builtins provide (a rough, module-level check)."""
    tree = ast.parse(code)
    bound, read = set(defined) | set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, (ast.Store, ast.Del)) else read).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound


# ------------------------------------------------------------------------------------------------- session
class _Session:
    """Runs the blocks in order in one working directory; namespaces[i] is what block i left."""

    def __init__(self, root: Path):
        self.root = root
        self.namespaces: dict[int, dict] = {}
        self.failed: set[int] = set()
        _tiny_model_dir(root)
        _jsonl_files(root)

    def run(self, i: int) -> dict:
        if i in self.namespaces:
            return self.namespaces[i]
        if i in self.failed:
            pytest.fail(f"README block {i} failed; the block after it runs in what it leaves")
        code = BLOCKS[i]
        for old, new in SHRINK:
            code = code.replace(old, new)
        injected = {}
        for marker, build in INJECT.items():
            if i == _index_of(marker):
                injected.update(build(self.root))
        # A block that reads names from earlier blocks continues their session; a self-contained one starts afresh.
        ns = {"__name__": "__readme__"}
        if i > 0 and _free_names(code, injected):
            ns = dict(self.run(i - 1))
        ns.update(injected)
        missing = _free_names(code, ns)
        assert not missing, f"README block {i} reads names nobody defines: {sorted(missing)} (add them to INJECT)"
        cwd = os.getcwd()
        os.chdir(self.root)
        try:
            exec(compile(code, f"README.md[python block {i}]", "exec"), ns)
        except BaseException:
            self.failed.add(i)
            raise
        finally:
            os.chdir(cwd)
        self.namespaces[i] = ns
        return ns


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return _Session(tmp_path_factory.mktemp("readme"))


# ----------------------------------------------------------------------------------------------- the checks
def _check_streams(ns, root):
    x, y = ns["x"], ns["y"]
    assert y.shape == (3 * x.shape[0], 4096)
    for part in (ns["y_ref"], ns["y_actor"], ns["y_critic"]):
        assert part.shape == x.shape and torch.isfinite(part).all()
    # The base stream is the wrapped linear layer, LoRA off.
    base = ns["layer"]
    ref = torch.nn.functional.linear(x, base.weight, base.bias)
    torch.testing.assert_close(ns["y_ref"], ref, rtol=1e-4, atol=1e-4)


def _check_logprobs(ns, root):
    shape = ns["targets"].shape
    for name in ("logp", "ref_logp", "kl", "entropy"):
        t = ns[name]
        assert t.shape == shape and t.dtype == torch.float32 and torch.isfinite(t).all(), name
    assert (ns["logp"] <= 0).all() and (ns["entropy"] >= 0).all() and (ns["kl"] >= -1e-6).all()   # k3 >= 0
    ns["logp"].sum().backward()
    assert ns["logits"].grad is not None and ns["logits"].grad.shape == ns["logits"].shape


def _check_linear_logprobs(ns, root):
    B, T = ns["targets"].shape
    logp, entropy, kl = ns["logp"], ns["entropy"], ns["kl"]
    assert logp.shape == (2, B, T) and entropy.shape == (2, B, T) and kl.shape == (B, T)
    assert torch.isfinite(logp).all() and (logp <= 0).all() and (kl >= -1e-6).all()
    logp[0].sum().backward()
    assert ns["actor_h"].grad is not None and ns["actor_h"].grad.shape == ns["actor_h"].shape


def _check_hydra_model(ns, root):
    from transformers import AutoModelForCausalLM

    from hydra_kernels.integrations import HydraModel
    B, T = ns["input_ids"].shape
    D = ns["hydra"].hidden_size
    assert ns["h"].shape == (3, B, T, D)
    assert ns["ref_logits"].shape == (B, T, ns["hydra"].lm_head_weight.shape[0])
    assert ns["score"].shape == (B,) and ns["values"].shape == (B, T)
    out, prompt_ids = ns["out"], ns["prompt_ids"]
    assert out.shape[0] == prompt_ids.shape[0] and out.shape[1] > prompt_ids.shape[1]
    assert torch.equal(out[:, :prompt_ids.shape[1]], prompt_ids)
    again = HydraModel.from_pretrained(root / "ckpt", base=str(root / MODEL_DIR))
    torch.testing.assert_close(again.reward_head.weight, ns["hydra"].reward_head.weight)
    merged = AutoModelForCausalLM.from_pretrained(str(root / "merged"), local_files_only=True)
    assert merged.config.vocab_size == ns["hydra"].lm_head_weight.shape[0]
    assert (root / "peft_actor" / "adapter_config.json").is_file()


def _check_rlhf(ns, root):
    from transformers import AutoModelForCausalLM
    assert {"eval/reward_accuracy", "eval/reward_margin"} <= set(ns["sft"].metrics)
    assert len(ns["ppo"].history) == 2                                   # steps, as shrunk by SHRINK
    last = ns["ppo"].history[-1]
    assert all(isinstance(last[k], float) for k in ("objective/scores", "objective/kl"))
    for says in (ns["sft_says"], ns["ppo_says"]):
        assert len(says) == 4 and all(isinstance(s, str) for s in says)
    assert (root / "runs/sft/final").is_dir() and (root / "runs/ppo/final").is_dir()
    # runs/policy is a plain transformers model that computes what the PPO actor computes.
    policy = AutoModelForCausalLM.from_pretrained(str(root / "runs/policy"), local_files_only=True).eval()
    # ... with the tokenizer PPO was given, so it is usable on its own.
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(root / "runs/policy"), local_files_only=True)("1+2=")["input_ids"]
    hydra, tok = ns["ppo"].models.hydra, ns["tok"]
    ids = tok(ns["prompts"][:2], padding=True, return_tensors="pt")
    device = hydra.lm_head_weight.device                # run.device "auto": CUDA where there is one
    with torch.no_grad():
        actor = hydra.lm_logits(hydra.forward_streams(ids["input_ids"].to(device), ids["attention_mask"].to(device),
                                                      streams=("actor",))[0]).cpu()
        mask = ids["attention_mask"]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)       # left padding: count from the first token
        plain = policy(input_ids=ids["input_ids"], attention_mask=mask, position_ids=positions).logits
    mask = mask.bool()
    torch.testing.assert_close(plain[mask], actor[mask], rtol=1e-4, atol=1e-4)


def _check_grpo(ns, root):
    res = ns["res"]
    assert [h["step"] for h in res.history] == [1, 2] and "frac_reward_zero_std" in res.history[-1]
    assert (root / "runs" / "grpo" / "final" / "policy.json").is_file()
    assert (root / "runs" / "grpo-policy" / "config.json").is_file()


# Block marker -> check(namespace, working directory). Every block must have one.
CHECKS = {
    'hk.streams(layer, "base", "actor", "critic")': _check_streams,
    "hk.ops.logprobs_and_kl(": _check_logprobs,
    "hk.ops.linear_logprobs(": _check_linear_logprobs,
    "HydraModel.from_pretrained_base": _check_hydra_model,
    "rlhf.train_ppo(": _check_rlhf,
    "rlhf.train_grpo(": _check_grpo,
}


def test_tables_match_the_readme():
    assert BLOCKS, "README.md has no ```python blocks"
    for old, _ in SHRINK:
        n = README_TEXT.count(old)
        assert n == 1, f"SHRINK entry {old!r} occurs {n} times in README.md (must be exactly once)"
        assert sum(old in code for code in BLOCKS) == 1, f"SHRINK entry {old!r} is not in a ```python block"
    for marker in INJECT:
        _index_of(marker)
    checked = sorted(_index_of(marker) for marker in CHECKS)
    assert checked == list(range(len(BLOCKS))), \
        f"every README python block needs exactly one entry in CHECKS; blocks checked: {checked} of {len(BLOCKS)}"


@pytest.mark.parametrize("i", range(len(BLOCKS)), ids=[_block_id(i, c) for i, c in enumerate(BLOCKS)])
def test_readme_block(i, session):
    ns = session.run(i)
    checks = [check for marker, check in CHECKS.items() if marker in BLOCKS[i]]
    assert len(checks) == 1, f"README block {i} needs exactly one entry in CHECKS"
    checks[0](ns, session.root)
