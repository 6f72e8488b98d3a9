"""Benchmark: memory and time of one PPO step, by variant (the comparison of Santacroce et al. 2023, "Efficient
RLHF: Reducing the Memory Usage of PPO").

Rows: variant x activation checkpointing (model.activation_checkpointing off / on), variants as in
hydra_kernels.rlhf.PPOConfig:
  full     full PPO: 4 models (reference, reward, actor, critic), actor and critic fully trained
  lora     LoRA-PPO: 4 models, actor and critic train a LoRA adapter each
  hydra    Hydra-PPO: one frozen base; actor and critic adapters; reference and reward model = LoRA off
  j-hydra  J-Hydra-PPO: one frozen base, one shared adapter (policy and values)

Each row runs in its own process (so its peak memory is its own; --isolation: a fresh interpreter per row on a GPU,
on CPU a fork of the parent taken after the imports and before any work): a Llama model is built from a config with
random weights (no download; bf16 on GPU, fp32 on CPU), a random reward head is added (as Hydra-SFT would leave
it: a memory/time benchmark needs no SFT), and `--steps` PPO steps run through hydra_kernels.rlhf.PPOTrainer,
the class train_ppo drives (train_ppo itself is not called: it would also write checkpoints and the final policy,
which is file I/O, not PPO). Reported from the LAST step (the first one is warm-up: Triton compilation and
autotuning, the optimizer's state allocation):
  - peak memory per phase, rollout (sampling with the KV cache) / score (old + reference log-probs, KL, values,
    reward) / update (advantages, ppo_epochs passes of minibatch forward + backward + AdamW); GPU:
    torch.cuda.max_memory_allocated, reset at the start of each phase; CPU: the process's peak resident set
    (VmHWM, reset per phase through /proc/self/clear_refs; the running maximum ru_maxrss where that fails),
    which includes the ~0.3-0.5 GiB of the Python/torch runtime itself;
  - memory in use at the start of the step (weights + optimizer state: what the step cannot free);
  - time per phase (the metrics time/rollout, time/score, time/update of PPOTrainer.step) and their sum;
  - parameters held in memory (every distinct parameter tensor of the PPO models, heads included) and trainable
    parameters (what AdamW updates), with their bytes, and the bytes of the optimizer state.

Fixed settings (options below): --batch-size prompts per rollout, all of exactly --prompt-len tokens (BOS +
random ids: no padding), --response-len new tokens per response, every response full length: the benchmark's
tokenizer has its EOS id outside the model's vocabulary, so EOS is never sampled (random weights would rarely
sample it anyway); --mini-batch-size rollouts per optimizer step, --ppo-epochs passes per step; LoRA rank
--lora-r, alpha = 2 r, all linear layers of the decoder (the library's default target). Greedy is not used:
temperature 1, top_p 1. CPU rows use 1 torch thread (--threads). Ratios in the table compare rows of the same
checkpointing setting: memory = the step's peak (the largest phase peak) above the row's baseline (what was in use
before its model was built: 0 allocated on a GPU, the runtime's resident set on CPU) vs full PPO and vs LoRA-PPO;
time = the step's time vs LoRA-PPO.

Rows that run out of memory are recorded as OOM (torch's OutOfMemoryError, or the process killed by SIGKILL,
the host's OOM killer); a failure or a time-out of one row never stops the others. `--budget` seconds bound the
whole run: rows not started by then are recorded as skipped (the no-checkpointing rows run first).

  python bench/bench_ppo_variants.py --quick                    # CPU-sized smoke run (tiny model), seconds
  python bench/bench_ppo_variants.py --model llama-1b --out bench/results   # GPU: all 8 rows
  python bench/bench_ppo_variants.py --variants hydra lora --checkpointing off --steps 4

Writes <out>/ppo_variants_<model>_<device>_<date>.json (device, versions, date, settings, every raw number,
per step) and a Markdown table next to it; prints the short table last.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
VARIANTS = ("full", "lora", "hydra", "j-hydra")
VARIANT_NAMES = {"full": "full PPO", "lora": "LoRA-PPO", "hydra": "Hydra-PPO", "j-hydra": "J-Hydra-PPO"}
PHASES = ("rollout", "score", "update")

# Llama shapes. tiny: CPU smoke tests; llama-160m: JackFram/llama-160m's shape; llama-1b: TinyLlama-1.1B's shape;
# llama-7b: Llama-2-7B's shape (the paper's scale; full PPO is not expected to fit one GPU).
MODELS = {
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "llama-160m": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12),
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    # Llama-2-13B's and Llama-2-70B's shapes (bench_memory.py's ledger: meta tensors only); llama-mid: a CPU-sized
    # model (~60 M parameters, ~0.25 GB in fp32) for bench_memory.py's real runs.
    "llama-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40),
    "llama-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8),
    "llama-mid": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8),
}
# Defaults. GPU: the numbers the GPU stage (bench/run_gpu.sh ppo) reports. QUICK: a CPU smoke run (--quick, or
# any run without a GPU).
GPU_DEFAULTS = dict(model="llama-1b", batch_size=16, mini_batch_size=8, ppo_epochs=1, prompt_len=128,
                    response_len=128, steps=3, lora_r=16)
QUICK_DEFAULTS = dict(model="tiny", batch_size=4, mini_batch_size=2, ppo_epochs=1, prompt_len=16,
                      response_len=16, steps=3, lora_r=8)
SEED = 0


# =========================================================================================== the worker
class BenchTokenizer:
    """The rlhf tokenizer contract for a model with random weights: a text is space-separated token ids.

    pad 0, bos 1; eos = vocab_size, an id the model cannot produce (its logits have vocab_size columns), so no
    response ever stops early: every rollout has exactly max_new_tokens tokens per row."""

    pad_token_id, bos_token_id = 0, 1

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_token_id = vocab_size

    def __len__(self):
        return self.vocab_size

    def encode(self, text, add_special_tokens=False):
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (0, 1, self.vocab_size)))


def make_prompts(n: int, prompt_len: int, vocab_size: int, seed: int = SEED) -> list[str]:
    """n prompts of prompt_len - 1 random non-special ids each (BOS makes prompt_len tokens)."""
    g = torch.Generator().manual_seed(seed + 12345)
    ids = torch.randint(2, vocab_size, (n, prompt_len - 1), generator=g)
    return [" ".join(map(str, row)) for row in ids.tolist()]


def build_model(name: str, device: torch.device, dtype: torch.dtype, max_positions: int, layers: int | None = None):
    """A LlamaForCausalLM of preset `name` with random weights, created directly on `device` in `dtype`
    (layers: that many decoder layers instead of the preset's)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = dict(MODELS[name], **({} if layers is None else {"num_hidden_layers": layers}))
    cfg = LlamaConfig(**shape, max_position_embeddings=max(2048, max_positions), tie_word_embeddings=False,
                      pad_token_id=BenchTokenizer.pad_token_id, bos_token_id=BenchTokenizer.bos_token_id,
                      eos_token_id=None, rms_norm_eps=1e-5, attention_dropout=0.0)   # EOS: see BenchTokenizer
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    # Parameters in `dtype` (the rotary inv_freq buffer stays fp32, as from_pretrained(dtype=...) leaves it).
    for p in model.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model.eval()


class MemProbe:
    """Peak memory per phase. cuda: max_memory_allocated (+ reserved), reset at every mark. cpu: VmHWM of
    /proc/self/status, reset through /proc/self/clear_refs (Linux >= 4.0); where that fails, ru_maxrss (a
    running maximum since the process started)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.source = "cuda_max_memory_allocated"
        else:
            self.source = "cpu_vmhwm_per_phase" if self._reset_hwm() else "cpu_ru_maxrss_running_max"

    @staticmethod
    def _status_mib(field: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
            return int(m.group(1)) / 1024 if m else None
        except OSError:
            return None

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.source == "cpu_vmhwm_per_phase":
            self._reset_hwm()

    def now_mib(self) -> float:
        """Memory in use now: allocated by torch (cuda) or the resident set (cpu)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device) / MIB
        rss = self._status_mib("VmRSS")
        return rss if rss is not None else float("nan")

    def peak(self) -> dict:
        """Peak since the last reset, then reset."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            out = {"peak_mib": torch.cuda.max_memory_allocated(self.device) / MIB,
                   "peak_reserved_mib": torch.cuda.max_memory_reserved(self.device) / MIB}
        elif self.source == "cpu_vmhwm_per_phase":
            out = {"peak_mib": self._status_mib("VmHWM"), "rss_file_mib": self.file_mib()}
        else:
            import resource
            out = {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "rss_file_mib": self.file_mib()}
        self.reset()
        return out

    def file_mib(self) -> float | None:
        """cpu: the file-backed part of the resident set (RssFile: library code paged in as ops first run, not
        tensors); None on a GPU."""
        return None if self.cuda else self._status_mib("RssFile")


def _trainer_class():
    from hydra_kernels.rlhf.ppo import PPOTrainer

    class PhaseTrainer(PPOTrainer):
        """PPOTrainer with a memory mark at the end of each phase of step(): rollout ends in rollout(), scoring
        when models.score returns, the update (rewards, advantages, minibatch passes) in _finish (none for a
        skipped batch)."""

        def __init__(self, *args, probe: MemProbe, **kwargs):
            super().__init__(*args, **kwargs)
            self.probe, self.phase, self.marks = probe, "init", {}
            score = self.models.score

            def marked_score(*a, **k):
                out = score(*a, **k)
                self.marks["score"] = self.probe.peak()
                self.phase = "update"
                return out
            self.models.score = marked_score

        def rollout(self, step):
            self.probe.reset()
            self.marks, self.phase = {}, "rollout"
            out = super().rollout(step)
            self.marks["rollout"] = self.probe.peak()
            self.phase = "score"
            return out

        def _finish(self, metrics):
            if not metrics["skipped"]:
                self.marks["update"] = self.probe.peak()
            self.phase = "done"
            return super()._finish(metrics)

    return PhaseTrainer


def _param_stats(params) -> tuple[int, int]:
    """(elements, bytes) of distinct tensors (by storage and offset: tied or shared weights count once)."""
    seen, n, nbytes = set(), 0, 0
    for p in params:
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), p.numel(), p.dtype)
        if key in seen:
            continue
        seen.add(key)
        n += p.numel()
        nbytes += p.numel() * p.element_size()
    return n, nbytes


def held_parameters(models) -> list:
    mods = [getattr(models, name, None) for name in ("model", "reference", "reward_model", "actor", "critic",
                                                      "reward_head", "value_head")]
    return [p for m in mods if m is not None for p in m.parameters()]


def optimizer_state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
               if torch.is_tensor(v))


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())) or isinstance(e, MemoryError):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg


def measure_row(spec: dict) -> dict:
    """Build the models of one row and run its PPO steps; the raw numbers of every step (in-process)."""
    import bench_logprobs as common
    from hydra_kernels.rlhf.config import DataConfig, LoRAConfig, ModelConfig, PPOConfig, RunConfig
    from hydra_kernels.rlhf import build_ppo_models, new_reward_head
    from hydra_kernels.rlhf.run import seed_everything

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    if device.type == "cpu" and spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out: dict = {"device_name": common.device_name(device), "torch": torch.__version__,
                 "threads": torch.get_num_threads() if device.type == "cpu" else None}
    probe = MemProbe(device)
    out["memory_source"] = probe.source
    trainer = None
    # Memory in use before anything of the row exists: 0 allocated on a GPU; on CPU, the resident set of the
    # runtime with every module the row needs imported (the same in both isolation modes).
    _preload()
    out["memory_baseline_mib"] = probe.now_mib()
    try:
        t0 = time.perf_counter()
        seed_everything(SEED)
        P, R, B = spec["prompt_len"], spec["response_len"], spec["batch_size"]
        model = build_model(spec["model"], device, dtype, P + R)
        vocab = MODELS[spec["model"]]["vocab_size"]
        tok = BenchTokenizer(vocab)
        head = new_reward_head(model, torch.Generator(device=device).manual_seed(SEED + 1))
        cfg = PPOConfig(variant=spec["variant"], steps=spec["steps"], batch_size=B,
                        mini_batch_size=spec["mini_batch_size"], ppo_epochs=spec["ppo_epochs"], max_new_tokens=R,
                        lora=LoRAConfig(r=spec["lora_r"], alpha=2.0 * spec["lora_r"]),
                        model=ModelConfig(dtype=spec["dtype"],
                                          activation_checkpointing=spec["activation_checkpointing"]),
                        data=DataConfig(max_prompt_len=P, max_len=P + R),
                        compile_rollout=bool(spec.get("compile_rollout")),
                        run=RunConfig(seed=SEED, device=str(device), progress=False,
                                      output_dir=spec.get("scratch") or tempfile.gettempdir()))
        models = build_ppo_models(model, head, cfg)
        del model, head
        trainer = _trainer_class()(models, tok, make_prompts(B * spec["steps"], P, vocab), cfg, probe=probe)
        out["build_s"] = time.perf_counter() - t0
        held = held_parameters(models)
        trainable = list(trainer.params.values())
        out["params_held"], out["bytes_held"] = _param_stats(held)
        out["params_trainable"], out["bytes_trainable"] = _param_stats(trainable)
        out["memory_after_build_mib"] = probe.now_mib()
        steps = []
        for s in range(spec["steps"]):
            start_mib = probe.now_mib()
            t = time.perf_counter()
            m = trainer.step(s)
            wall = time.perf_counter() - t
            marks = dict(trainer.marks)
            rec = {"step": s + 1, "wall_s": wall, "start_mib": start_mib, "skipped": m.get("skipped"),
                   "response_length": m.get("env/response_length"), "ended": m.get("env/ended")}
            for ph in PHASES:
                rec[f"time_{ph}_s"] = m.get(f"time/{ph}")
                mk = marks.get(ph, {})
                rec[f"peak_{ph}_mib"] = mk.get("peak_mib")
                if "peak_reserved_mib" in mk:
                    rec[f"peak_reserved_{ph}_mib"] = mk["peak_reserved_mib"]
            times = [rec[f"time_{ph}_s"] for ph in PHASES]
            rec["time_step_s"] = sum(times) if all(v is not None for v in times) else None
            peaks = [rec[f"peak_{ph}_mib"] for ph in PHASES if rec[f"peak_{ph}_mib"] is not None]
            rec["peak_step_mib"] = max(peaks) if peaks else None
            steps.append(rec)
            print(f"  step {s + 1}: {wall:.2f} s, peak {_fmt(rec['peak_step_mib'])} MiB", flush=True)
        out["steps"] = steps
        out["optimizer_state_bytes"] = optimizer_state_bytes(trainer.optimizer)
        out["memory_after_steps_mib"] = probe.now_mib()
        out["counters"] = dict(trainer.counters)
        out["status"] = "ok"
    except BaseException as e:                               # noqa: BLE001 - a row reports, never raises
        if isinstance(e, KeyboardInterrupt):
            raise
        out["status"] = "OOM" if _is_oom(e) else "error"
        out["phase"] = trainer.phase if trainer is not None else "build"
        out["error"] = f"{type(e).__name__}: {e}"[:600]
        out["traceback"] = traceback.format_exc()[-3000:]
        try:
            out["peak_at_failure_mib"] = probe.peak()["peak_mib"]
        except Exception:                                    # noqa: BLE001
            pass
    return out


def worker_main(spec_path: str, result_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    res = measure_row(spec)
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(tmp, result_path)
    return 0


# =========================================================================================== the parent
def _preload() -> None:
    """Import what every row needs, once, in the parent (rows forked from it start without paying for it)."""
    import bench_logprobs  # noqa: F401
    import hydra_kernels.rlhf  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401


def _fork_entry(spec_path: str, result_path: str, log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    worker_main(spec_path, result_path)
    sys.stdout.flush()
    sys.stderr.flush()


def run_isolated(spec: dict, timeout: float, workdir: pathlib.Path, isolation: str) -> dict:
    """Run one row in its own process; its result, or why there is none.

    isolation "subprocess": a fresh Python interpreter per row (the GPU default: the parent never initialises
    CUDA, and every row gets a clean CUDA context). "fork": a fork of the parent, which has imported torch,
    transformers and hydra_kernels but run nothing (CPU only: a process that has touched CUDA cannot fork); it
    saves the ~3-5 s of imports per row on a small CPU, and each row still has its own address space and peak."""
    tag = f"{spec['variant']}_ckpt-{'on' if spec['activation_checkpointing'] else 'off'}"
    spec_path, result_path, log_path = (workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json",
                                        workdir / f"{tag}.log")
    spec = dict(spec, scratch=str(workdir / f"{tag}.scratch"))
    spec_path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    if isolation == "fork":
        import multiprocessing
        proc = multiprocessing.get_context("fork").Process(
            target=_fork_entry, args=(str(spec_path), str(result_path), str(log_path)), daemon=True)
        proc.start()
        proc.join(max(timeout, 1.0))
        if proc.is_alive():
            proc.kill()
            proc.join()
            rc = None
        else:
            rc = proc.exitcode
    else:
        env = dict(os.environ)
        env.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # later rows reuse the autotuner's choices (warm-up only)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--_worker", str(spec_path), str(result_path)]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(timeout, 1.0))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
            except BaseException:                    # interrupted (Ctrl-C, the stage's time limit): no orphan
                os.killpg(proc.pid, signal.SIGKILL)
                raise
    wall = time.perf_counter() - t0
    if result_path.exists():
        res = json.loads(result_path.read_text())
    else:
        tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
        if rc is None:
            res = {"status": "timeout", "error": f"no result within {timeout:.0f} s"}
        elif rc == -signal.SIGKILL:
            res = {"status": "OOM", "error": "process killed by SIGKILL (the host's OOM killer, most likely)"}
        else:
            res = {"status": "error", "error": f"worker exited with rc={rc} and no result"}
        res["log_tail"] = tail
    res["process_wall_s"] = wall
    res["isolation"] = isolation
    return res


def _last(res: dict) -> dict:
    steps = res.get("steps") or []
    return steps[-1] if steps else {}


def summarize(rows: list[dict]) -> None:
    """Add the last step's numbers and the ratios (same checkpointing setting) to every row, in place."""
    for r in rows:
        last = _last(r) if r.get("status") == "ok" else {}
        r["last"] = {k: last.get(k) for k in ("peak_step_mib", "time_step_s", "start_mib", "skipped",
                                              *(f"peak_{p}_mib" for p in PHASES), *(f"time_{p}_s" for p in PHASES))}
        peak, base = r["last"]["peak_step_mib"], r.get("memory_baseline_mib")
        r["last"]["peak_above_baseline_mib"] = peak - base if peak is not None and base is not None else None
    key = {(r["variant"], r["activation_checkpointing"]): r for r in rows}
    for r in rows:
        ok = r.get("status") == "ok"
        for ref in ("full", "lora"):
            o = key.get((ref, r["activation_checkpointing"]))
            mem = r["last"]["peak_above_baseline_mib"]
            ref_mem = (o or {}).get("last", {}).get("peak_above_baseline_mib")
            r[f"memory_vs_{ref}"] = mem / ref_mem if ok and mem and ref_mem else None
            if ref == "lora":
                t, ref_t = r["last"]["time_step_s"], (o or {}).get("last", {}).get("time_step_s")
                r["time_vs_lora"] = t / ref_t if ok and t and ref_t else None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else "") if head.returncode == 0 else None
    except Exception:                                        # noqa: BLE001
        return None


def _versions() -> dict:
    import bench_logprobs as common
    from importlib.metadata import PackageNotFoundError, version
    v = common.versions()
    for name in ("transformers", "peft"):
        try:
            v[name] = version(name)
        except PackageNotFoundError:
            v[name] = None
    return v


# ------------------------------------------------------------------------------------------ reporting
def _fmt(v, nd=3):
    import bench_logprobs as common
    return common._fmt(v, nd)


def _gib(mib):
    return None if mib is None else mib / 1024


def _ratio(v):
    return "-" if v is None else f"{v:.2f}x"


def short_table(result: dict) -> list[str]:
    lines = ["| variant | act. ckpt | params held (M) | trainable (M) | step peak GiB | mem vs full | mem vs LoRA "
             "| step s | time vs LoRA |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        name = f"{VARIANT_NAMES[r['variant']]}"
        ck = "on" if r["activation_checkpointing"] else "off"
        if r.get("status") != "ok":
            held = _fmt(r["params_held"] / 1e6) if r.get("params_held") else "-"
            lines.append(f"| {name} | {ck} | {held} | - | {r.get('status') or '?'} | - | - | - | - |")
            continue
        lines.append(f"| {name} | {ck} | {_fmt(r['params_held'] / 1e6)} | {_fmt(r['params_trainable'] / 1e6)} | "
                     f"{_fmt(_gib(r['last']['peak_step_mib']))} | {_ratio(r['memory_vs_full'])} | "
                     f"{_ratio(r['memory_vs_lora'])} | {_fmt(r['last']['time_step_s'])} | "
                     f"{_ratio(r['time_vs_lora'])} |")
    return lines


def markdown(result: dict) -> str:
    meta, s = result["meta"], result["settings"]
    m = MODELS[s["model"]]
    gpu = meta["device_type"] == "cuda"
    mem_what = ("torch.cuda.max_memory_allocated per phase" if gpu else
                "process peak resident set per phase (includes the Python/torch runtime)")
    lines = [
        f"# PPO variants: memory and time per PPO step — {meta['device']}", "",
        f"- date (UTC): {meta['date']}; commit {meta.get('commit')}; versions: {json.dumps(meta['versions'])}",
        f"- model `{s['model']}` (Llama, random weights): hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
        f"{m['num_attention_heads']} heads / {m['num_key_value_heads']} KV heads, intermediate "
        f"{m['intermediate_size']}, vocab {m['vocab_size']}; {s['dtype']}",
        f"- per PPO step: {s['batch_size']} prompts x {s['prompt_len']} tokens, {s['response_len']} new tokens each "
        f"(always full length), minibatch {s['mini_batch_size']}, {s['ppo_epochs']} PPO epoch(s); LoRA r "
        f"{s['lora_r']}, alpha {2 * s['lora_r']}, all linear layers; AdamW"
        + ("; rollouts with compile_rollout (static KV cache, compiled step)" if s.get("compile_rollout") else ""),
        f"- numbers from step {s['steps']} of {s['steps']} (step 1 is warm-up); memory: {mem_what}; "
        "memory ratios: step peak above the row's baseline (before its model was built"
        + (")" if gpu else ": the runtime's resident set)") + ", against the row of the same checkpointing setting",
        "",
        *short_table(result), "",
        "## Per phase (last step)", "",
        "| variant | act. ckpt | baseline GiB | in use at step start GiB | peak rollout GiB | peak score GiB | "
        "peak update GiB | rollout s | score s | update s | held GiB | trainable GiB | optimizer state GiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        last = r.get("last") or {}
        ck = "on" if r["activation_checkpointing"] else "off"
        ok = r.get("status") == "ok"
        cells = [VARIANT_NAMES[r["variant"]], ck, _fmt(_gib(r.get("memory_baseline_mib"))),
                 _fmt(_gib(last.get("start_mib"))),
                 *(_fmt(_gib(last.get(f"peak_{p}_mib"))) for p in PHASES),
                 *(_fmt(last.get(f"time_{p}_s")) for p in PHASES),
                 _fmt(r["bytes_held"] / GIB) if ok else "-", _fmt(r["bytes_trainable"] / GIB) if ok else "-",
                 _fmt(r["optimizer_state_bytes"] / GIB) if ok else "-",
                 ("ok" + (" (batch skipped: non-finite scores)" if last.get("skipped") else "")) if ok
                 else f"{r.get('status')}: {r.get('error', '')}".replace("|", "/").replace("\n", " ")[:160]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["",
              "params held: every distinct parameter tensor of the PPO models (4 models for full / LoRA-PPO, one base "
              "+ adapters for the Hydra variants; heads included). trainable: what AdamW updates (LoRA-PPO and "
              "Hydra-PPO train the same number: two adapters and the value head). in use at step start: memory "
              "allocated (GPU) or resident (CPU) before the step: weights + optimizer state (+ the runtime on CPU). "
              "The paper's own numbers are not repeated here (other models, sequence lengths and hardware).", ""]
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: str, tag: str = "") -> tuple[pathlib.Path, pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = "".join(c if c.isalnum() else "-" for c in result["meta"]["device"].lower()).strip("-")[:40]
    stamp = result["meta"]["date"].replace(":", "").replace("-", "")[:15]
    stem = f"ppo_variants_{result['settings']['model']}_{dev}_{stamp}{('_' + tag) if tag else ''}"
    j, m = out / f"{stem}.json", out / f"{stem}.md"
    j.write_text(json.dumps(result, indent=1, default=str))
    m.write_text(markdown(result))
    return j, m


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized smoke run: tiny model and short sequences")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even where a GPU exists")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the JSON + Markdown")
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"any of {list(VARIANTS)} (or a comma list)")
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"],
                    help="activation checkpointing settings to run")
    ap.add_argument("--model", choices=list(MODELS), help=f"preset (default {GPU_DEFAULTS['model']} on GPU, "
                                                          f"{QUICK_DEFAULTS['model']} with --quick / on CPU)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default bfloat16 on GPU, float32 on CPU")
    for name, what in (("batch_size", "prompts per rollout"), ("mini_batch_size", "rollouts per optimizer step"),
                       ("ppo_epochs", "passes over the rollout per PPO step"),
                       ("prompt_len", "prompt tokens (BOS included)"), ("response_len", "new tokens per response"),
                       ("steps", "PPO steps per row (the last is reported)"), ("lora_r", "LoRA rank (alpha = 2 r)")):
        ap.add_argument("--" + name.replace("_", "-"), type=int, dest=name,
                        help=f"{what} (default {GPU_DEFAULTS[name]} on GPU, {QUICK_DEFAULTS[name]} quick)")
    ap.add_argument("--budget", type=float, default=0, help="seconds for all rows; rows not started by then are "
                                                           "skipped (0 = no limit)")
    ap.add_argument("--row-timeout", type=float, default=900, help="seconds per row before it is killed")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch intra-op threads per row (0 = torch's "
                                                            "default; 1 avoids OpenMP oversubscription noise)")
    ap.add_argument("--isolation", choices=["auto", "subprocess", "fork"], default="auto",
                    help="how each row gets its own process: auto = subprocess on GPU, fork on CPU")
    ap.add_argument("--compile-rollout", action="store_true",
                    help="PPOConfig.compile_rollout: static KV cache + compiled decoding step (step 1 compiles)")
    ap.add_argument("--_worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    return ap


def settings_from_args(args, gpu: bool) -> dict:
    quick = args.quick or not gpu
    base = QUICK_DEFAULTS if quick else GPU_DEFAULTS
    s = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in base.items()}
    s["dtype"] = args.dtype or ("bfloat16" if gpu else "float32")
    s["device"] = "cuda" if gpu else "cpu"
    s["quick"] = quick
    if s["prompt_len"] < 2 or s["response_len"] < 1:
        raise SystemExit("--prompt-len must be >= 2 (BOS + one token) and --response-len >= 1")
    if s["batch_size"] % s["mini_batch_size"]:
        raise SystemExit(f"--mini-batch-size {s['mini_batch_size']} must divide --batch-size {s['batch_size']}")
    return s


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args._worker:
        return worker_main(*args._worker)
    gpu = torch.cuda.is_available() and not args.cpu        # the parent never touches the device itself
    if not gpu and not args.quick:
        print("no CUDA device (or --cpu): defaults are the quick CPU settings (explicit options still apply)",
              file=sys.stderr)
    s = settings_from_args(args, gpu)
    variants = [v for item in args.variants for v in item.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    s["compile_rollout"] = args.compile_rollout
    specs = [dict(s, variant=v, activation_checkpointing=ck == "on", threads=args.threads)
             for ck in ("off", "on") if ck in args.checkpointing for v in VARIANTS if v in variants]
    now = _dt.datetime.now(_dt.timezone.utc)
    print(f"PPO variants: model {s['model']} ({s['dtype']}, {s['device']}), batch {s['batch_size']} x "
          f"({s['prompt_len']} prompt + {s['response_len']} response) tokens, minibatch {s['mini_batch_size']}, "
          f"{s['ppo_epochs']} epoch(s), {s['steps']} steps; {len(specs)} rows", flush=True)
    isolation = args.isolation if args.isolation != "auto" else ("subprocess" if gpu else "fork")
    if isolation == "fork":
        if gpu:
            raise SystemExit("--isolation fork: CPU only (a CUDA run needs a fresh process per row)")
        _preload()
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        for spec in specs:
            label = f"{spec['variant']:<8} ckpt {'on ' if spec['activation_checkpointing'] else 'off'}"
            left = args.budget - (time.perf_counter() - t_start) if args.budget else float("inf")
            if left < 5:
                res = {"status": "skipped", "error": "time budget spent before this row started"}
            else:
                res = run_isolated(spec, min(args.row_timeout, left), pathlib.Path(tmp), isolation)
            res.update(variant=spec["variant"], activation_checkpointing=spec["activation_checkpointing"])
            last = _last(res)
            print(f"{label}: {res['status']}" + (
                f", peak {_fmt(_gib(last.get('peak_step_mib')))} GiB, step {_fmt(last.get('time_step_s'))} s, "
                f"held {res['params_held'] / 1e6:.3g} M params, trainable {res['params_trainable'] / 1e6:.3g} M"
                if res["status"] == "ok" else f" ({res.get('error', '')[:200]})"), flush=True)
            rows.append(res)
    summarize(rows)
    first_ok = next((r for r in rows if r.get("device_name")), {})
    meta = {"bench": "bench/bench_ppo_variants.py", "date": now.isoformat(timespec="seconds"),
            "device": first_ok.get("device_name") or ("cuda" if gpu else "cpu"), "device_type": s["device"],
            "versions": _versions(), "commit": _git_commit(), "wall_s": time.perf_counter() - t_start,
            "memory_source": first_ok.get("memory_source"), "isolation": isolation,
            "argv": sys.argv[1:] if argv is None else list(argv)}
    result = {"meta": meta, "settings": s, "rows": rows}
    j, m = write_outputs(result, args.out, args.tag)
    print(f"wrote {j} and {m}")
    print()
    print(f"PPO step, {s['model']} ({s['dtype']}) on {meta['device']}: batch {s['batch_size']}, prompt "
          f"{s['prompt_len']}, response {s['response_len']}; last of {s['steps']} steps")
    print("\n".join(short_table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
