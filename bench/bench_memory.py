"""Benchmark: the memory of one PPO step by variant, from the library's own code paths run on meta tensors with a
ledger of every allocation (issue 16: "PPO at the memory of SFT, so that a larger batch fits").

What runs: bench_ppo_variants' PhaseTrainer (hydra_kernels.rlhf.PPOTrainer with a mark per phase) on the models
of each layout, built from a transformers LlamaConfig on the meta device (no weights exist, shapes only):
  hydra, j-hydra, lora, full   the library's variants (hydra_kernels.rlhf.variants)
  trl-style                    TRL's PPO with peft: a LoRA policy whose reference is the same copy with the
                               adapter off, a separate LoRA value model and a separate frozen reward model
                               (3 copies; peft's LoRA layers, fp32 adapters on the 16-bit base as
                               get_peft_model keeps them; log-probs from materialised fp32 logits, old log-probs
                               recomputed, one backward of policy + value loss)
The library's variants run with their defaults: hydra, lora and full backpropagate the actor's and the critic's
losses one after the other (separate_backward).
One PPO step = rollout (sampling response_len tokens with the KV cache), score (no grad: old and reference
log-probs, KL, values, reward) and update (one minibatch of the whole batch: forward + backward + clipping +
AdamW step). The optimizer state exists before the step (one warm-up AdamW step on zero gradients), so the
step is a steady-state one.

The ledger (Ledger below) is a TorchDispatchMode: it sees every aten op, including autograd's backward
temporaries, and counts the bytes of every meta storage from its creation until its last reference dies
(a weakref finalizer on the storage); the peak of live bytes per phase is reported. What it models:
  - attention as flash attention (O(T) memory: the output and the fp32 log-sum-exp are saved for backward,
    no [T, T] scores); meta tensors have no real kernel, so a registered transformers attention function
    produces exactly those tensors;
  - the library's torch backend of every op (the one CPU and meta tensors run), temporaries included: the
    library's custom ops run their torch kernels under the ledger (torch.library.get_kernel), not their fake
    kernels; the Triton kernels on a GPU allocate no more than it does; the for-loop AdamW step (on CUDA the
    fused step: no temporaries either);
  - no allocator effects (caching, fragmentation), no CUDA context, no CPU-side tensors.
Data-dependent Python (.item(), bool(), .tolist()) reads fixed values: no row ends before response_len
tokens, every finite-check passes.

Per layout and activation-checkpointing setting, two ledger runs (batch b1 and b2) give per phase
peak(b) = fixed + b * per_sample; the largest batch that fits a budget is the largest b with every phase's
fitted peak <= budget (80 GB and 141 GB: 80e9 and 141e9 bytes).

Validation: a real CPU run (mid-size Llama, fp32, a fresh forked process per row) measures the step's peak
resident set above the process's baseline, less the file-backed pages (RssFile: library code paged in); the
ledger predicts the same shapes; the ratio is reported. The same
real runs time Hydra-PPO (old_logprobs=rollout) against the TRL-style layout, interleaved, 1 thread. On a GPU,
--gpu-check runs one real step of a small shape and compares torch.cuda.max_memory_allocated with the ledger.

  python bench/bench_memory.py --out bench/results/memory --budget 900     # the full table + validation
  python bench/bench_memory.py --quick --out /tmp/m                        # tiny shapes, seconds

Writes <out>/memory_<date>.json (settings, versions, machine, every raw number, `targets`) and memory_<date>.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import multiprocessing
import os
import pathlib
import platform
import sys
import tempfile
import time
import traceback
import warnings
import weakref
from unittest import mock

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402  public base of torch's FlopCounterMode
from torch.utils._pytree import tree_flatten  # noqa: E402  (used by torch.utils.flop_counter the same way)

import bench_ppo_variants as bpv  # noqa: E402

GB = 10 ** 9
GIB = 1 << 30
PHASES = ("rollout", "score", "update")
LAYOUTS = ("hydra", "j-hydra", "lora", "full", "trl-style")
NAMES = {**bpv.VARIANT_NAMES, "trl-style": "TRL-style (peft)"}
BUDGETS_GB = (80, 141)
DEPTHS = (2, 3)             # decoder layers of the two ledger runs per batch (fit_row extrapolates in depth)
BATCHES = (1, 2, 16, 32)    # the two lines per phase (fit_row)
VERIFY_MAX_BATCH = 40       # fit_row verifies answers up to this batch (sampling costs a few ops per row)
SHAPES = ("llama-7b", "llama-13b", "llama-70b")
# The issue's setting: bf16 weights, fp32 adapters r = 128 on all linears, 256 + 256 tokens.
FULL = dict(dtype="bfloat16", lora_r=128, prompt_len=256, response_len=256, batches=BATCHES)
QUICK = dict(dtype="float32", lora_r=8, prompt_len=16, response_len=8, batches=BATCHES)
# The real CPU comparison: mid-size model, fp32 (a few hundred MB a copy), short sequences, 1 thread.
CPU_REAL = dict(model="llama-mid", dtype="float32", lora_r=16, prompt_len=64, response_len=32, batch=4, steps=2)
# The GPU check: one real step (the second; the first compiles) vs the ledger, small enough for a 30 s share.
GPU_CHECK = dict(model="llama-160m", layout="hydra", ckpt=False, dtype="bfloat16", lora_r=16, prompt_len=64,
                 response_len=64, batch=8)
QUICK_REAL = dict(model="tiny", dtype="float32", lora_r=8, prompt_len=16, response_len=8, batch=2, steps=2)


# ============================================================================================ the ledger
class Ledger(TorchDispatchMode):
    """Live bytes of every meta storage, from the op that creates it to the death of its last reference, and
    the peak since the last reset(); reset()/peak() are bench_ppo_variants.MemProbe's interface, so its
    PhaseTrainer marks the phases. Data-dependent reads of meta tensors answer fixed values: item() of a bool
    from any() -> False (no bad token id, nothing non-finite), any other -> bool_value() (False while sampling,
    so no row ends early; True elsewhere, so the all-finite checks pass); of a number -> 1; a copy to the CPU ->
    zeros."""

    source = "ledger (meta tensors)"

    def __init__(self, bool_value=lambda: True):
        super().__init__()
        self.live_bytes = 0
        self._live: dict[int, int] = {}
        self._peak = 0
        self.bool_value = bool_value
        self.total_allocated = 0

    def _free(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def track(self, t: torch.Tensor) -> None:
        if t.device.type != "meta":
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:
            return
        n = st.nbytes()
        self._live[key] = n
        weakref.finalize(st, self._free, key)
        self.live_bytes += n
        self.total_allocated += n
        self._peak = max(self._peak, self.live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SCALAR_READS and args[0].device.type == "meta":
            if args[0].dtype == torch.bool or func is torch.ops.aten.is_nonzero.default:
                return False if getattr(args[0], "ledger_from_any", False) else bool(self.bool_value())
            return 1.0 if args[0].is_floating_point() else 1
        if (func is torch.ops.aten._to_copy.default and args[0].device.type == "meta"
                and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"):
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func.namespace == "hydra_kernels" and OP_WORKSPACE:
            # The library's own ops run their torch backend here, under the ledger, so the temporaries inside
            # them (the chunked logits of linear_logprobs, rounded adapters) count; their fake kernels only
            # allocate outputs.
            with self:
                out = torch.library.get_kernel(func, "CPU").call_boxed(
                    torch.DispatchKeySet(torch.DispatchKey.CPU), *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if func.overloadpacket is torch.ops.aten.any:
            out.ledger_from_any = True
        if isinstance(out, torch.Tensor):
            self.track(out)
        else:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.track(t)
        return out

    # --- MemProbe's interface
    def reset(self) -> None:
        self._peak = self.live_bytes

    def now_mib(self) -> float:
        return self.live_bytes / bpv.MIB

    def peak(self) -> dict:
        out = {"peak_mib": self._peak / bpv.MIB, "peak_bytes": self._peak}
        self.reset()
        return out


# bool(t) reaches a mode as is_nonzero inside the ops' kernels (re-entered below), as .item() elsewhere.
_SCALAR_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)
# torch.library.get_kernel (torch >= 2.9) reaches the ops' torch backend; without it they count outputs only.
OP_WORKSPACE = hasattr(torch.library, "get_kernel")


# ------------------------------------------------------------------------------ attention as flash attention
class _FlashShape(torch.autograd.Function):
    """Flash attention's memory on meta tensors: forward returns the output [B, T, H, Dh] and saves q, k, v,
    the output and the fp32 log-sum-exp [B, H, T]; backward returns dq, dk, dv. No values are computed."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[3])
        lse = q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def flash_shape_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A transformers attention function (query [B, H, T, Dh], key/value [B, Hkv, S, Dh], not repeated for GQA,
    as flash attention reads them) -> ([B, T, H, Dh], None)."""
    if query.device.type != "meta":
        raise ValueError("query: flash_shape_attention only models memory on meta tensors")
    return _FlashShape.apply(query, key, value), None


ATTENTION = "hydra_ledger_flash"


def _register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    AttentionInterface.register(ATTENTION, flash_shape_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


# ======================================================================================= the layouts
def build_layout(layout: str, model, head, cfg):
    """The PPO models of `layout` from `model` + `head`: a library variant, or the TRL-style layout."""
    from hydra_kernels.rlhf import build_ppo_models
    if layout != "trl-style":
        return build_ppo_models(model, head, dataclasses.replace(cfg, variant=layout))
    return _trl_style_class().build(model, copy.deepcopy(head).float().requires_grad_(False),
                                    dataclasses.replace(cfg, variant="lora"))


def _trl_style_class():
    from peft import LoraConfig, get_peft_model
    from hydra_kernels.rlhf.models import PolicyHandle
    from hydra_kernels.rlhf.variants import LoRAPPO, SeparatePPO
    from hydra_kernels.integrations.activation_checkpointing import enable_activation_checkpointing
    from hydra_kernels.integrations import disable_dropout

    class TRLStylePPO(LoRAPPO):
        """TRL's PPOTrainer with a peft policy: the reference is the policy copy with its adapter off
        (PeftModel.disable_adapter()), the value model its own copy with a LoRA adapter, the reward model a frozen
        copy: 3 copies of the base. The adapters are peft's LoRA layers as get_peft_model makes them (fp32 on a
        16-bit base: each adapted linear upcasts its input for lora_A and keeps that copy for backward). Scoring
        and the update run SeparatePPO's code (separate forwards, materialised fp32 logits), the update one
        backward of the summed loss (TRL's PolicyAndValueWrapper). actor_stream / critic_stream only label which
        copy runs: every call of the copies runs their peft adapter, except the reference's."""
        variant = "trl-style"
        separate_roles = False

        @classmethod
        def build(cls, model, reward_head, cfg):
            def prep(m):
                disable_dropout(m)
                return m.eval()
            value_head = copy.deepcopy(reward_head).requires_grad_(True)
            reward_model = prep(model).requires_grad_(False)
            lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                              target_modules=cfg.lora.target_modules)
            with warnings.catch_warnings():      # peft reads transformers' deprecated is_gradient_checkpointing
                warnings.simplefilter("ignore", FutureWarning)
                peft_actor, peft_critic = [get_peft_model(prep(copy.deepcopy(model)).requires_grad_(False), lora)
                                           for _ in range(2)]
            actor, critic = peft_actor.base_model.model, peft_critic.base_model.model
            if cfg.model.activation_checkpointing:
                enable_activation_checkpointing(actor)
                enable_activation_checkpointing(critic)
            out = cls(reward_head, value_head, actor, reward_model, actor, critic)
            out.peft_actor = (peft_actor,)         # a tuple: not registered as a submodule of `out`
            return out

        def policies(self):
            return {"actor": PolicyHandle(self.actor, None)}

        def _hidden(self, model, rollout, stream):
            if model is self.reference and stream is None:
                with self.peft_actor[0].disable_adapter():
                    return SeparatePPO._hidden(model, rollout, None)
            return SeparatePPO._hidden(model, rollout, None)

    return TRLStylePPO


def _config(spec: dict):
    from hydra_kernels.rlhf.config import DataConfig, LoRAConfig, ModelConfig, PPOConfig, RunConfig
    P, R, B = spec["prompt_len"], spec["response_len"], spec["batch"]
    return PPOConfig(variant="hydra", steps=spec.get("steps", 1), batch_size=B, mini_batch_size=B, ppo_epochs=1,
                     max_new_tokens=R, lora=LoRAConfig(r=spec["lora_r"], alpha=2.0 * spec["lora_r"]),
                     model=ModelConfig(dtype=spec["dtype"], activation_checkpointing=spec["ckpt"]),
                     data=DataConfig(max_prompt_len=P, max_len=P + R),
                     old_logprobs=spec.get("old_logprobs", "recompute"),
                     run=RunConfig(seed=bpv.SEED, device=spec.get("device", "cpu"), progress=False,
                                   output_dir=tempfile.gettempdir()))


def _warm_optimizer(trainer) -> None:
    """One AdamW step on zero gradients: the optimizer state exists before the measured step (steady state)."""
    for p in trainer.params.values():
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _cpu_generators():
    """Meta tensors have no generator: the rollout's per-row generators are made on the CPU (multinomial on
    meta tensors draws nothing)."""
    import hydra_kernels.rlhf.ppo as ppo
    orig = ppo.row_generators

    def rows(seed, step, rows_, device):
        return orig(seed, step, rows_, torch.device("cpu") if device.type == "meta" else device)
    with mock.patch.object(ppo, "row_generators", rows):
        yield


def ledger_step(spec: dict) -> dict:
    """Build `spec["layout"]` at `spec["model"]`'s shape on meta and run one PPO step under the ledger: bytes
    live after the build (weights), at the step's start (+ optimizer state) and the peak of every phase."""
    from hydra_kernels.rlhf import new_reward_head
    from hydra_kernels.rlhf.run import seed_everything
    _register_attention()
    trainer = None
    ledger = Ledger(lambda: trainer is None or trainer.phase != "rollout")
    meta = torch.device("meta")
    cfg = _config(spec)           # run.device is not read: the models are on meta
    P, R, B = spec["prompt_len"], spec["response_len"], spec["batch"]
    vocab = bpv.MODELS[spec["model"]]["vocab_size"]
    with ledger, _cpu_generators():
        seed_everything(bpv.SEED)
        model = bpv.build_model(spec["model"], meta, getattr(torch, spec["dtype"]), P + R, spec.get("layers"))
        model.config._attn_implementation = ATTENTION
        head = new_reward_head(model)
        models = build_layout(spec["layout"], model, head, cfg)
        del model, head
        trainer = bpv._trainer_class()(models, bpv.BenchTokenizer(vocab), bpv.make_prompts(B, P, vocab), cfg,
                                       probe=ledger)
        weights = ledger.live_bytes
        _warm_optimizer(trainer)
        start = ledger.live_bytes
        trainer.step(0)
        marks = dict(trainer.marks)
    out = {"weights_bytes": weights, "start_bytes": start, "trainable_bytes": sum(
        p.numel() * p.element_size() for p in trainer.params.values()), "optimizer_state_bytes": bpv.optimizer_state_bytes(trainer.optimizer)}
    for ph in PHASES:
        out[f"peak_{ph}_bytes"] = marks[ph]["peak_bytes"]
    out["peak_step_bytes"] = max(out[f"peak_{ph}_bytes"] for ph in PHASES)
    return out


def depth_peaks(spec: dict, batch: int, depths=DEPTHS) -> dict:
    """Ledger runs at `batch` and two depths (decoder layers), extrapolated to the preset's depth: every term of
    a phase's peak (weights, optimizer state, KV cache, saved activations) grows linearly with the number of
    identical decoder layers, so the peak at full depth is on the line through the two shallow runs
    (check_depth compares a full-depth run)."""
    l1, l2 = depths
    depth = bpv.MODELS[spec["model"]]["num_hidden_layers"]
    r1, r2 = (ledger_step({**spec, "batch": batch, "layers": n}) for n in (l1, l2))
    keys = [k for k in r1 if k.endswith("_bytes")]
    return {k: r1[k] + (r2[k] - r1[k]) / (l2 - l1) * (depth - l1) for k in keys}


def fit_row(spec: dict, batches=BATCHES, depths=DEPTHS, verify_gb: int | None = None) -> dict:
    """Per phase, two lines through the (depth-extrapolated) peaks: `small` through batches b1, b2 and `large`
    through b3, b4. A phase's peak is the larger of two moments, one that grows slowly with the batch (e.g. the
    optimizer step: gradients + state) and one that grows fast (the backward with every activation alive), so
    peak(b) = max(small(b), large(b)). Reported: fixed = small's intercept (the step's bytes at no batch), per
    sample = large's slope (what each further sample costs), the largest batch within each budget; verify_gb:
    that budget's answer is checked and corrected by ledger runs (verify_max_batch, for b up to
    VERIFY_MAX_BATCH)."""
    pts = {b: depth_peaks(spec, b, depths) for b in batches}
    b1, b2, b3, b4 = batches
    row = {"points": {str(b): p for b, p in pts.items()}, "depth": bpv.MODELS[spec["model"]]["num_hidden_layers"],
           "depths": list(depths), "batches": list(batches)}
    for k in ("weights_bytes", "start_bytes", "optimizer_state_bytes", "trainable_bytes"):
        row[k] = pts[b1][k]
    for ph in PHASES:
        key = f"peak_{ph}_bytes"
        s_small = (pts[b2][key] - pts[b1][key]) / (b2 - b1)
        s_large = (pts[b4][key] - pts[b3][key]) / (b4 - b3)
        row[f"{ph}_lines"] = [[pts[b1][key] - b1 * s_small, s_small], [pts[b3][key] - b3 * s_large, s_large]]
        row[f"{ph}_fixed_bytes"] = pts[b1][key] - b1 * s_small
        row[f"{ph}_per_sample_bytes"] = s_large
    row["fixed_bytes"] = max(row[f"{ph}_fixed_bytes"] for ph in PHASES)
    row["per_sample_bytes"] = max(row[f"{ph}_per_sample_bytes"] for ph in PHASES)
    for gb in BUDGETS_GB:
        row[f"max_batch_{gb}gb"] = max_batch(row, gb * GB)
    if verify_gb is not None and row[f"max_batch_{verify_gb}gb"] <= VERIFY_MAX_BATCH:
        verify_max_batch(spec, row, verify_gb, depths)
    return row


def verify_max_batch(spec: dict, row: dict, budget_gb: int, depths=DEPTHS, max_moves: int = 8) -> None:
    """Ledger runs at the fitted largest batch b and its neighbours move the answer to the largest batch that
    fits by direct runs (b fits, b + 1 does not; at most max_moves steps): the two-line fit is off where a
    phase's peak bends between the measured batches. row["verify"] records the fit's answer, every run's step
    peak and ok (the fit was right); row[f"max_batch_{budget_gb}gb"] becomes the checked answer."""
    budget, key = budget_gb * GB, f"max_batch_{budget_gb}gb"
    fitted = b = row[key]
    chk: dict[str, float] = {}

    def peak(n: int) -> float:
        if str(n) not in chk:
            chk[str(n)] = max(depth_peaks(spec, n, depths)[f"peak_{ph}_bytes"] for ph in PHASES)
        return chk[str(n)]
    while b > 0 and abs(b - fitted) < max_moves and peak(b) > budget:
        b -= 1
    while abs(b - fitted) < max_moves and peak(b + 1) <= budget:
        b += 1
    row["verify"] = {"budget_gb": budget_gb, "fitted": fitted, "step_peak_bytes": chk, "ok": b == fitted}
    row[key] = b


def peak_at(row: dict, ph: str, b: int) -> float:
    return max(a + s * b for a, s in row[f"{ph}_lines"])


def max_batch(row: dict, budget: float) -> int:
    """The largest batch b whose fitted peak is within budget in every phase (0 if none fits; peak_at is
    non-decreasing in b, so a bisection finds it)."""
    def fits(b):
        return all(peak_at(row, ph, b) <= budget for ph in PHASES)
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 10 ** 7:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_depth(spec: dict, row: dict, batch: int = 1) -> dict:
    """One full-depth ledger run vs the depth extrapolation of `row` (same spec) at `batch`: ratio per phase."""
    full = ledger_step({**spec, "batch": batch})
    out = {"batch": batch, "full_depth": full}
    for ph in PHASES:
        out[f"{ph}_extrapolated_over_full"] = peak_at(row, ph, batch) / full[f"peak_{ph}_bytes"]
    return out


# ================================================================================ the real CPU runs
def return_freed_memory() -> bool:
    """glibc: serve every allocation over 64 KiB with mmap and unmap it when freed (M_MMAP_THRESHOLD, which also
    stops glibc raising the threshold after a free), and trim the heap now: the resident set then follows the
    live bytes, not the heap's high-water mark of an earlier step. False where glibc is not there."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 64 * 1024) == 1          # M_MMAP_THRESHOLD = -3
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def real_row(spec: dict) -> dict:
    """One real row on the CPU (in a forked process): peak resident set above the baseline per phase (VmHWM,
    reset per phase) and time per phase of the last of spec["steps"] steps. spec["trim"]: return_freed_memory()
    first (the memory runs; the timing runs keep glibc's defaults)."""
    from hydra_kernels.rlhf import new_reward_head
    from hydra_kernels.rlhf.run import seed_everything
    torch.set_num_threads(1)
    trimmed = return_freed_memory() if spec.get("trim") else False
    probe = bpv.MemProbe(torch.device("cpu"))
    # Tensors, not code: the file-backed pages (libraries paged in as ops first run) are left out of every number.
    base = probe.now_mib() - (probe.file_mib() or 0.0)
    P, R, B = spec["prompt_len"], spec["response_len"], spec["batch"]
    vocab = bpv.MODELS[spec["model"]]["vocab_size"]
    cfg = _config(spec)
    seed_everything(bpv.SEED)
    model = bpv.build_model(spec["model"], torch.device("cpu"), getattr(torch, spec["dtype"]), P + R)
    head = new_reward_head(model, torch.Generator().manual_seed(bpv.SEED + 1))
    models = build_layout(spec["layout"], model, head, cfg)
    del model, head
    trainer = bpv._trainer_class()(models, bpv.BenchTokenizer(vocab), bpv.make_prompts(B * spec["steps"], P, vocab),
                                   cfg, probe=probe)
    _warm_optimizer(trainer)
    out = {"baseline_mib": base, "memory_source": probe.source + " less RssFile", "trimmed": trimmed, "steps": []}
    for s in range(spec["steps"]):
        start = probe.now_mib() - (probe.file_mib() or 0.0)
        m = trainer.step(s)
        rec = {"start_mib": start - base, **{f"time_{ph}_s": m[f"time/{ph}"] for ph in PHASES}}
        for ph in PHASES:
            mk = trainer.marks[ph]
            # RssFile only grows during a phase, so at the mark it bounds the file pages at the peak from above.
            rec[f"peak_{ph}_mib"] = mk["peak_mib"] - (mk.get("rss_file_mib") or 0.0) - base
            rec[f"rss_file_{ph}_mib"] = mk.get("rss_file_mib")
        rec["peak_step_mib"] = max(rec[f"peak_{ph}_mib"] for ph in PHASES)
        rec["time_step_s"] = sum(rec[f"time_{ph}_s"] for ph in PHASES)
        out["steps"].append(rec)
    out["last"] = out["steps"][-1]
    return out


def _fork_target(spec, conn):
    try:
        conn.send({"status": "ok", **real_row(spec)})
    except BaseException as e:                               # noqa: BLE001 - a row reports, never raises
        conn.send({"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    conn.close()


def run_forked(spec: dict, timeout: float) -> dict:
    bpv._preload()
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_fork_target, args=(spec, send), daemon=True)
    proc.start()
    res = recv.recv() if recv.poll(max(timeout, 1.0)) else {"status": "timeout"}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return res


def cpu_comparison(real: dict, repeats: int, deadline: float) -> dict:
    """Hydra-PPO (old_logprobs=rollout) vs the TRL-style layout, real CPU rows interleaved (h, t, h, t, ...),
    each its own forked process; the median step time and peak over the repeats; and the ledger's prediction
    of each row's peak at the same shapes."""
    specs = {"hydra": dict(real, layout="hydra", ckpt=False, old_logprobs="rollout"),
             "trl-style": dict(real, layout="trl-style", ckpt=False)}
    runs = {k: [] for k in specs}
    mem_runs = {k: run_forked(dict(spec, trim=True), max(deadline - time.perf_counter(), 60))
                for k, spec in specs.items()}
    for i in range(repeats):
        for k, spec in specs.items():
            left = deadline - time.perf_counter()
            if left < 10 and i > 0:
                break
            runs[k].append(run_forked(spec, max(left, 60)))
    out = {"settings": real, "rows": {}}
    for k, spec in specs.items():
        ok = [r for r in runs[k] if r.get("status") == "ok"]
        mem = mem_runs[k] if mem_runs[k].get("status") == "ok" else None
        pred = ledger_step({**spec, "steps": 1})
        out["rows"][k] = {
            "runs": runs[k], "memory_run": mem_runs[k], "n_ok": len(ok),
            "time_step_s": _median([r["last"]["time_step_s"] for r in ok]),
            "peak_step_mib_default_malloc": _median([r["last"]["peak_step_mib"] for r in ok]),
            "peak_step_mib": mem["last"]["peak_step_mib"] if mem else None,
            "ledger_peak_step_mib": pred["peak_step_bytes"] / bpv.MIB, "ledger": pred}
        row = out["rows"][k]
        row["ledger_over_real"] = (row["ledger_peak_step_mib"] / row["peak_step_mib"]
                                   if row["peak_step_mib"] else None)
    h, t = out["rows"]["hydra"], out["rows"]["trl-style"]
    out["time_ratio"] = h["time_step_s"] / t["time_step_s"] if h["time_step_s"] and t["time_step_s"] else None
    out["peak_ratio"] = h["peak_step_mib"] / t["peak_step_mib"] if h["peak_step_mib"] and t["peak_step_mib"] else None
    return out


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]))


# ================================================================================= the GPU check
def gpu_check(spec: dict, device: str = "cuda") -> dict:
    """One real step on the GPU (bf16) vs the ledger at the same shapes: torch.cuda.max_memory_allocated per
    phase above the memory allocated before the model was built (device="cpu": the same code on the CPU's
    resident set, which tests run)."""
    from hydra_kernels.rlhf import new_reward_head
    from hydra_kernels.rlhf.run import seed_everything
    dev = torch.device(device)
    probe = bpv.MemProbe(dev)
    base = probe.now_mib()
    P, R, B = spec["prompt_len"], spec["response_len"], spec["batch"]
    vocab = bpv.MODELS[spec["model"]]["vocab_size"]
    cfg = _config({**spec, "device": device})
    seed_everything(bpv.SEED)
    model = bpv.build_model(spec["model"], dev, getattr(torch, spec["dtype"]), P + R)
    head = new_reward_head(model, torch.Generator(device=dev).manual_seed(bpv.SEED + 1))
    models = build_layout(spec["layout"], model, head, cfg)
    del model, head
    trainer = bpv._trainer_class()(models, bpv.BenchTokenizer(vocab), bpv.make_prompts(2 * B, P, vocab), cfg,
                                   probe=probe)
    _warm_optimizer(trainer)
    for s in range(2):                                       # the first step compiles and autotunes
        trainer.step(s)
    real = {ph: trainer.marks[ph]["peak_mib"] - base for ph in PHASES}
    pred = ledger_step(spec)
    out = {"settings": spec, "real_peak_mib": real, "ledger_peak_mib": {ph: pred[f"peak_{ph}_bytes"] / bpv.MIB
                                                                        for ph in PHASES}}
    out["ledger_over_real"] = max(out["ledger_peak_mib"].values()) / max(real.values())
    return out


# ======================================================================================== reporting
def _gb(b):
    return "-" if b is None else f"{b / GB:.2f}"


FALLING = ("n/a: the fitted peak falls with the batch between the two largest batches (the optimizer step's "
           "fixed peak dominates there), so no per-sample cost is measured")


def _per_sample(b):
    """Bytes per sample in GB; a negative slope is a fit artifact, shown as n/a* (footnote FALLING)."""
    return "n/a*" if b is not None and b < 0 else _gb(b)


def _footnote(lines: list[str]) -> list[str]:
    return lines + ["", "\\* " + FALLING] if any("n/a*" in line for line in lines) else lines


def table_rows(result: dict) -> list[dict]:
    rows = []
    for shape, by in result["ledger"].items():
        for layout in LAYOUTS:
            off, on = by.get(f"{layout}/off"), by.get(f"{layout}/on")
            if off is None and on is None:
                continue
            rows.append({"shape": shape, "layout": layout, "off": off, "on": on})
    return rows


def headline_table(result: dict) -> list[str]:
    lines = ["| shape | layout | fixed GB | per sample GB (ckpt off / on) | update per sample GB (off / on) | "
             "max batch 80 GB (off / on) | max batch 141 GB (off / on) |", "|---|---|---|---|---|---|---|"]
    for r in table_rows(result):
        off, on = r["off"] or {}, r["on"] or {}

        def pair(k, fmt=_gb):
            return f"{fmt(off.get(k)) if off else '-'} / {fmt(on.get(k)) if on else '-'}"
        lines.append(f"| {r['shape']} | {NAMES[r['layout']]} | {_gb((off or on).get('fixed_bytes'))} | "
                     f"{pair('per_sample_bytes', _per_sample)} | {pair('update_per_sample_bytes', _per_sample)} | "
                     f"{pair('max_batch_80gb', str)} | {pair('max_batch_141gb', str)} |")
    return _footnote(lines)


def targets(result: dict) -> list[dict]:
    """issue 16's targets, each with its value, threshold and MET (ok) / MISSED."""
    out = []
    by = result["ledger"].get("llama-7b", {})

    def best(layout, key):      # the better of checkpointing off / on (each layout at its best)
        vals = [by[f"{layout}/{ck}"][key] for ck in ("off", "on") if f"{layout}/{ck}" in by]
        return vals

    if best("hydra", "max_batch_80gb"):
        h = max(best("hydra", "max_batch_80gb"))
        for ref, tid, k in (("lora", "memory.batch_vs_lora", 5), ("trl-style", "memory.batch_vs_trl", 3)):
            if best(ref, "max_batch_80gb"):
                lo = max(best(ref, "max_batch_80gb"))
                out.append(dict(id=tid, issue="issue 16", where="ledger, llama-7b, best of ckpt off/on",
                                target=f"Hydra-PPO's largest batch in 80 GB >= {k}x {NAMES[ref]}'s", value=h,
                                need=f">= {k} x {lo}", ok=h >= k * lo and h > 0))
        for ck in ("off", "on"):
            if f"hydra/{ck}" in by and f"trl-style/{ck}" in by:
                hu, tu = by[f"hydra/{ck}"]["update_per_sample_bytes"], by[f"trl-style/{ck}"]["update_per_sample_bytes"]
                out.append(dict(id="memory.per_sample_vs_trl" + ("" if ck == "off" else ".ckpt"), issue="issue 16",
                                where=f"ledger, llama-7b, ckpt {ck}",
                                target="per-sample update bytes <= 0.5x TRL-style's",
                                value=round(hu / tu, 3), need="<= 0.5", ok=hu <= 0.5 * tu))
    cpu = result.get("cpu")
    if cpu and cpu.get("time_ratio") is not None:
        out.append(dict(id="memory.cpu_time_vs_trl", issue="issue 16", where=f"real CPU, {cpu['settings']['model']}",
                        target="Hydra-PPO step (old_logprobs=rollout) <= 0.85x TRL-style's time",
                        value=round(cpu["time_ratio"], 3), need="<= 0.85", ok=cpu["time_ratio"] <= 0.85))
    if cpu and cpu.get("peak_ratio") is not None:
        out.append(dict(id="memory.cpu_peak_vs_trl", issue="issue 16", where=f"real CPU, {cpu['settings']['model']}",
                        target="Hydra-PPO step peak <= 0.55x TRL-style's", value=round(cpu["peak_ratio"], 3),
                        need="<= 0.55", ok=cpu["peak_ratio"] <= 0.55))
    if cpu:
        for k, row in cpu["rows"].items():
            if row.get("ledger_over_real") is not None:
                v = row["ledger_over_real"]
                out.append(dict(id=f"memory.ledger_vs_rss.{k}", issue="issue 16",
                                where=f"real CPU, {cpu['settings']['model']}, {k}",
                                target="ledger's step peak within 10% of the real peak RSS (above baseline)",
                                value=round(v, 3), need="0.9 .. 1.1", ok=0.9 <= v <= 1.1))
    g = result.get("gpu")
    if g and g.get("ledger_over_real") is not None:
        v = g["ledger_over_real"]
        out.append(dict(id="memory.ledger_vs_cuda", issue="issue 16", where="GPU, torch.cuda.max_memory_allocated",
                        target="ledger's step peak within 10% of max_memory_allocated", value=round(v, 3),
                        need="0.9 .. 1.1", ok=0.9 <= v <= 1.1))
    return out


def markdown(result: dict) -> str:
    meta, s = result["meta"], result["settings"]
    lines = [f"# PPO memory per step, by layout (ledger on meta tensors) — {meta['date']}", "",
             f"- machine: {meta['machine']}; versions: {json.dumps(meta['versions'])}; commit {meta.get('commit')}",
             f"- command: `{meta['command']}`",
             f"- shapes: {', '.join(result['ledger'])}; {s['dtype']} weights, fp32 LoRA adapters r = {s['lora_r']} "
             f"(alpha 2r) on all linear layers, {s['prompt_len']} prompt + {s['response_len']} response tokens; one "
             "minibatch = the batch, 1 PPO epoch, AdamW state present before the step",
             "- ledger: every meta storage's bytes from creation to the death of its last reference (a "
             "TorchDispatchMode), peak per phase; attention modelled as flash attention (output + fp32 log-sum-exp "
             "saved, no [T, T] scores); the library's torch backend of every op; no allocator overhead, no CUDA "
             "context. Each row: ledger runs at 2 and 3 decoder layers extrapolated linearly to the full depth, at "
             f"batches {', '.join(map(str, s['batches']))}; per phase peak(b) = max(line through the first two, "
             "line through the last two): fixed = the first line's intercept, per sample = the second line's slope "
             "(the table's per-sample columns: the largest phase slope); max batch = the largest batch whose every "
             "phase fits (1 GB = 1e9 bytes); at the first shape, ledger runs around that batch check and correct the "
             f"80 GB answer where it is at most {VERIFY_MAX_BATCH} (`verify` in the JSON)", "",
             *headline_table(result), ""]
    lines += ["## Per phase (GB: fixed + per sample)", "",
              "| shape | layout | ckpt | weights | optimizer state | rollout | score | update |",
              "|---|---|---|---|---|---|---|---|"]
    for shape, by in result["ledger"].items():
        for key, r in by.items():
            layout, ck = key.split("/")
            cells = [f"{_gb(r[f'{ph}_fixed_bytes'])} + {_per_sample(r[f'{ph}_per_sample_bytes'])}" for ph in PHASES]
            lines.append(f"| {shape} | {NAMES[layout]} | {ck} | {_gb(r['weights_bytes'])} | "
                         f"{_gb(r['optimizer_state_bytes'])} | " + " | ".join(cells) + " |")
    ver = [(shape, key, r["verify"]) for shape, by in result["ledger"].items() for key, r in by.items()
           if r.get("verify")]
    if ver:
        lines += ["", "Max-batch checks (ledger runs around the fitted answer, step peak GB; the table shows the "
                  "checked answer): " + "; ".join(
                      f"{shape} {NAMES[key.split('/')[0]]} ckpt {key.split('/')[1]}: " + ", ".join(
                          f"b={b} {v / GB:.2f}" for b, v in sorted(chk["step_peak_bytes"].items(), key=lambda x: int(x[0])))
                      + (" (fit right)" if chk["ok"] else f" (fit said {chk.get('fitted')})")
                      for shape, key, chk in ver)]
    dc = result.get("depth_check")
    if dc:
        lines += ["", f"Depth extrapolation check ({dc['shape']}, {NAMES[dc['layout']]}, ckpt {dc['ckpt']}, batch "
                  f"{dc['batch']}): extrapolated / full-depth ledger peak: " + ", ".join(
                      f"{ph} {dc[f'{ph}_extrapolated_over_full']:.4f}" for ph in PHASES)]
    cpu = result.get("cpu")
    if cpu:
        cs = cpu["settings"]
        lines += ["", "## Real CPU run (validation and time)", "",
                  f"{cs['model']} ({bpv.MODELS[cs['model']]}), {cs['dtype']}, batch {cs['batch']} x ({cs['prompt_len']} + "
                  f"{cs['response_len']}) tokens, LoRA r {cs['lora_r']}, 1 thread, each row a forked process, rows "
                  f"interleaved; last of {cs['steps']} steps, median over repeats; peak: VmHWM per phase less RssFile (code "
                  "pages, not tensors) above the same before the model was built, from one run per layout with glibc's mmap "
                  "threshold fixed at 64 KiB (freed tensors leave the resident set; with glibc's defaults the "
                  "heap keeps an earlier step's high-water mark: the 'default malloc' column, from the timing "
                  "runs). Hydra-PPO with old_logprobs=rollout; TRL-style recomputes the old log-probs and "
                  "runs one backward of policy + value loss (as TRL does).", "",
                  "| layout | timing runs | step s | peak MiB (real) | peak MiB (ledger) | ledger / real | "
                  "peak MiB (default malloc) |", "|---|---|---|---|---|---|---|"]
        for k, row in cpu["rows"].items():
            lines.append(f"| {NAMES[k]} | {row['n_ok']} | {bpv._fmt(row['time_step_s'])} | "
                         f"{bpv._fmt(row['peak_step_mib'])} | {bpv._fmt(row['ledger_peak_step_mib'])} | "
                         f"{bpv._fmt(row['ledger_over_real'])} | {bpv._fmt(row.get('peak_step_mib_default_malloc'))} |")
        lines += ["", f"Hydra / TRL-style: time {bpv._fmt(cpu['time_ratio'])}, peak {bpv._fmt(cpu['peak_ratio'])}"]
    g = result.get("gpu")
    if g:
        lines += ["", "## GPU check", "", f"settings {json.dumps(g['settings'])}: real "
                  f"{json.dumps({k: round(v, 1) for k, v in g['real_peak_mib'].items()})} MiB, ledger "
                  f"{json.dumps({k: round(v, 1) for k, v in g['ledger_peak_mib'].items()})} MiB, ratio "
                  f"{bpv._fmt(g['ledger_over_real'])}"]
    lines += ["", "## Targets", "", "| target | where | value | need | |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['where']} | {t['value']} | {t['need']} | "
                     f"{'MET' if t['ok'] else 'MISSED'} |")
    return "\n".join(lines) + "\n"


README_START, README_END = "<!-- memory-table:start -->", "<!-- memory-table:end -->"


def readme_block(result: dict, source: str) -> list[str]:
    """The README's headline memory table: per shape and layout, the largest batch within 80 / 141 GB and the
    update's bytes per sample, at the better activation-checkpointing setting of each layout."""
    s = result["settings"]
    lines = [f"One PPO step at Llama shapes, {s['dtype']} weights, fp32 LoRA r = {s['lora_r']} on all linears, "
             f"{s['prompt_len']} + {s['response_len']} tokens (ledger of every allocation on meta tensors, "
             f"attention as flash attention; `{source}`, {result['meta']['date'][:10]}). Largest batch in "
             "80 / 141 GB, and the update's GB per sample, each layout with activation checkpointing off / on:", "",
             "| shape | layout | fixed GB | update GB / sample (off / on) | batch in 80 GB (off / on) | "
             "batch in 141 GB (off / on) |", "|---|---|---|---|---|---|"]
    for r in table_rows(result):
        off, on = r["off"] or {}, r["on"] or {}

        def pair(k, fmt):
            return f"{fmt(off[k]) if off else '-'} / {fmt(on[k]) if on else '-'}"
        lines.append(f"| {_label(r['shape'])} | "
                     f"{NAMES[r['layout']]} | {_gb((off or on)['fixed_bytes'])} | "
                     f"{pair('update_per_sample_bytes', _per_sample)} | {pair('max_batch_80gb', str)} | "
                     f"{pair('max_batch_141gb', str)} |")
    return _footnote(lines)


def _label(shape: str) -> str:
    """llama-7b -> Llama-7B; other presets as named."""
    return "Llama-" + shape[6:].upper() if shape.startswith("llama-") and shape[6:-1].isdigit() else shape


def update_readme(json_paths, readme: pathlib.Path = ROOT / "README.md") -> None:
    """Rewrite the README's block between README_START and README_END from results JSONs (the first one's
    settings and date; the ledger rows of all, later files adding shapes and rows the earlier ones lack)."""
    json_paths = [json_paths] if isinstance(json_paths, str) else list(json_paths)
    results = [json.loads(pathlib.Path(p).read_text()) for p in json_paths]
    result = results[0]
    for other in results[1:]:
        if other["settings"] != result["settings"]:
            raise ValueError(f"readme: {json_paths} were measured with different settings")
        for shape, rows in other["ledger"].items():
            for key, row in rows.items():
                result["ledger"].setdefault(shape, {}).setdefault(key, row)
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"readme: {readme} has no {README_START} ... {README_END} block")
    source = " + ".join(str(pathlib.Path(p).resolve().relative_to(ROOT))
                        if pathlib.Path(p).resolve().is_relative_to(ROOT)
                        else p for p in json_paths)
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_START + "\n" + "\n".join(readme_block(result, source)) + "\n" + README_END + tail)


def write_outputs(result: dict, out_dir: str) -> tuple[pathlib.Path, pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = result["meta"]["date"].replace(":", "").replace("-", "")[:15]
    j, m = out / f"memory_{stamp}.json", out / f"memory_{stamp}.md"
    for path, text in ((j, json.dumps(result, indent=1, default=str)), (m, markdown(result))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return j, m


# ============================================================================================== main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory"))
    ap.add_argument("--budget", type=float, default=900, help="seconds for the whole run (rows not started by then "
                                                             "are left out and say so)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and a tiny real CPU run (smoke test)")
    ap.add_argument("--shapes", nargs="+", help=f"model presets for the ledger (default {list(SHAPES)})")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--real-steps", type=int, default=None, help="steps per real CPU row (the last is reported)")
    ap.add_argument("--repeats", type=int, default=3, help="real CPU rows per layout (interleaved)")
    ap.add_argument("--no-ledger", action="store_true", help="only the real CPU comparison (and GPU check)")
    ap.add_argument("--no-real", action="store_true", help="skip the real CPU comparison (the default where CUDA "
                                                           "is available: the GPU check runs instead)")
    ap.add_argument("--readme", metavar="JSON", nargs="+",
                    help="only rewrite README.md's memory table from results JSONs (rows merged)")
    ap.add_argument("--depth-check", action="store_true",
                    help="one full-depth ledger run (the first shape, Hydra-PPO) vs the depth extrapolation")
    ap.add_argument("--no-gpu-check", action="store_true",
                    help="where CUDA is available, skip the real GPU step vs the ledger (run first by default)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.readme:
        update_readme(args.readme)
        return 0
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    s = dict(QUICK if args.quick else FULL)
    shapes = [] if args.no_ledger else (args.shapes or (["tiny"] if args.quick else list(SHAPES)))
    bad = [x for x in shapes if x not in bpv.MODELS]
    if bad:
        raise SystemExit(f"--shapes: unknown {bad}; choose from {list(bpv.MODELS)}")
    torch.set_num_threads(1)
    now = _dt.datetime.now(_dt.timezone.utc)
    result = {"meta": {"bench": "bench/bench_memory.py", "date": now.isoformat(timespec="seconds"),
                       "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
                       "versions": bpv._versions(), "commit": bpv._git_commit(),
                       "command": "python bench/bench_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)},
              "settings": s, "ledger": {}, "skipped": []}
    real = dict(QUICK_REAL if args.quick else CPU_REAL)
    if args.real_steps:
        real["steps"] = args.real_steps
    # The real CPU comparison gets up to 40% of the budget, first (it decides two targets and validates).
    gpu = torch.cuda.is_available()
    if not args.no_real and not gpu:
        try:
            result["cpu"] = cpu_comparison(real, args.repeats, t0 + 0.4 * args.budget)
        except Exception as e:                                # noqa: BLE001 - reported, the ledger still runs
            result["cpu_error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
        print(f"cpu comparison done (+{time.perf_counter() - t0:.0f} s)", flush=True)
    if gpu and not args.no_gpu_check:
        try:
            result["gpu"] = gpu_check(dict(GPU_CHECK))
        except Exception as e:                                # noqa: BLE001
            result["gpu_error"] = f"{type(e).__name__}: {e}"
    # Order: what decides the targets first (7B, ckpt off, Hydra / LoRA / TRL-style), then the rest.
    order = [(shape, ck, layout) for shape in shapes for ck in args.checkpointing for layout in args.layouts]
    first = [(shapes[0], ck, lay) for ck in args.checkpointing for lay in ("hydra", "lora", "trl-style")
             if shapes]
    order = [x for x in first if x in order] + [x for x in order if x not in first]
    for shape in shapes:
        result["ledger"][shape] = {}
    for shape, ck, layout in order:
        by = result["ledger"][shape]
        if time.perf_counter() > deadline:
            result["skipped"].append(f"{shape} {layout} ckpt {ck}: time budget spent")
            continue
        t = time.perf_counter()
        spec = dict(model=shape, layout=layout, ckpt=ck == "on",
                    **{k: s[k] for k in ("dtype", "lora_r", "prompt_len", "response_len")})
        try:
            by[f"{layout}/{ck}"] = r = fit_row(spec, s["batches"], verify_gb=80 if shape == shapes[0] else None)
        except Exception as e:                                # noqa: BLE001
            result["skipped"].append(f"{shape} {layout} ckpt {ck}: {type(e).__name__}: {e}")
            traceback.print_exc()
            continue
        print(f"{shape} {layout:<9} ckpt {ck:<3}: fixed {_gb(r['fixed_bytes'])} GB, per sample "
              f"{_gb(r['per_sample_bytes'])} GB, max batch 80 GB {r['max_batch_80gb']} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        if args.depth_check and "depth_check" not in result and layout == "hydra":
            result["depth_check"] = {"shape": shape, "layout": layout, "ckpt": ck,
                                     **check_depth(spec, r, s["batches"][0])}
        write_outputs(dict(result, targets=targets(result)), args.out)   # what is measured so far survives a kill
    result["targets"] = targets(result)
    result["meta"]["wall_s"] = time.perf_counter() - t0
    j, m = write_outputs(result, args.out)
    print(f"wrote {j} and {m}")
    print("\n".join(headline_table(result)))
    for t in result["targets"]:
        print(f"{'MET   ' if t['ok'] else 'MISSED'} {t['id']}: {t['value']} (need {t['need']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
