#!/usr/bin/env bash
# One GPU session's checks and measurements, in few device calls (each must end inside 10 minutes).
#
#   bash bench/run_gpu.sh tests    # ~6 min: CUDA JIT build (ptxas report), every @gpu test, the demo on GPU
#   bash bench/run_gpu.sh bench    # ~9 min: HBM/GEMM ceilings + quick sweeps of every benchmark
#   bash bench/run_gpu.sh lora     # full bench_lora_linear sweep (issue 2's table), if device time is left
#   bash bench/run_gpu.sh logprobs # full bench_logprobs sweep (issue 3's tables) + CUDA tuning
#   bash bench/run_gpu.sh ppo      # ~5-6 min (limit 9.5): memory + time per PPO step, full/LoRA/Hydra/J-Hydra PPO
#                                  # x activation checkpointing off / on, llama-1b shape (bench_ppo_variants.py)
#   bash bench/run_gpu.sh decode   # ~5 min: generate() ms/token, llama-1b, 16 x (128 + 128): plain HF, peft LoRA,
#                                  # Hydra actor / base, Hydra actor with the CUDA small-batch kernel, HF and Hydra
#                                  # static-cache + torch.compile (CUDA graphs) (bench_decode.py)
#
# Everything a stage writes (JSON + Markdown results, logs, junit XML) is packed into $OUT/gpu_<stage>.tgz
# (the device tool returns at most 8 files); a short table is printed last. Unpack it into bench/results/
# and commit it. Never changes the card's settings.
set -uo pipefail
stage=${1:-tests}
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
W=$(mktemp -d)
# Wheels carried from the dev machine (the GPU machine has no internet), e.g. Liger-Kernel for the log-prob
# baselines: here `pip download liger-kernel==0.8.5 --no-deps -d .whl` (pure Python; torch and triton are on the
# GPU image), then run the stage with carry [".whl"]. Installed outside site-packages, for this run only; their
# console scripts go on PATH (e.g. a `ninja` wheel, should the image lack the ninja that the CUDA JIT build needs).
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/hk_site .whl/*.whl \
        && export PYTHONPATH=/tmp/hk_site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/hk_site/bin:$PATH
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stamp=$(date -u +%Y%m%dT%H%MZ)

# The device call is killed at 600 s, and what a stage wrote is packed only at its end: every step's limit is cut
# to what is left before END seconds of this script (SECONDS), less the KILL_AFTER grace that `timeout` gives a
# process after its SIGINT, so the last step ends, and the tar and the summary run, inside the call. (The stages'
# nominal limits add up to more than that, e.g. tests 240 + 330 + 120 s.) A step with under 5 s left is skipped.
END=${HK_RUN_GPU_END:-575}
KILL_AFTER=${HK_RUN_GPU_KILL_AFTER:-20}
step() {   # step NAME SECONDS CMD...: run with a time limit, log to $W/NAME.log, remember the status
    local name=$1 limit=$2; shift 2
    local left=$((END - KILL_AFTER - SECONDS))
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt 5 ]; then
        echo "=== $name skipped: no time left before ${END}s"
        echo "$name skipped (no time left)" >> "$W/status.txt"
        return
    fi
    echo "=== $name ($(date -u +%T), limit ${limit}s): $*"
    timeout --signal=INT --kill-after="$KILL_AFTER" "$limit" "$@" > "$W/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$W/$name.log"
    echo "$name rc=$rc" >> "$W/status.txt"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    git log -1 --format='commit %H %cd' 2>/dev/null || true
    date -u
} > "$W/env.txt" 2>&1
cat "$W/env.txt"

case "$stage" in
  tests)
    step cuda_build 240 env HYDRA_KERNELS_VERBOSE_BUILD=1 HYDRA_KERNELS_PTXAS_VERBOSE=1 \
        python3 -c "import hydra_kernels.kernels.cuda as c; c.load(); print('cuda extension loaded')"
    step gpu_tests 330 python3 -m pytest -q -m gpu tests -p no:cacheprovider --timeout 150 \
        --junitxml="$W/gpu_tests.xml" -rfE
    step demo_gpu 120 python3 -m hydra_kernels.cli demo --quick --out "$W/demo"
    ;;
  bench)
    step bench_lora_quick 200 python3 bench/bench_lora_linear.py --quick --out "$W" --tag quick
    step bench_logprobs_quick 200 python3 bench/bench_logprobs.py --section all --quick --out "$W"
    step tune_cuda_lora 120 python3 bench/tune_cuda_lora.py --out "$W"
    ;;
  lora)
    step bench_lora_4096 270 python3 bench/bench_lora_linear.py --shapes 4096x4096 --out "$W" --tag 4096x4096
    step bench_lora_11008 270 python3 bench/bench_lora_linear.py --shapes 4096x11008 --out "$W" --tag 4096x11008
    ;;
  logprobs)
    step bench_logits 270 python3 bench/bench_logprobs.py --section logits --impls ours cuda eager chunked compile liger --out "$W"
    step bench_linear 270 python3 bench/bench_logprobs.py --section linear --out "$W"
    ;;
  ppo)
    # 8 rows (each a fresh process), llama-1b shape in bf16: 16 prompts x (128 + 128) tokens, minibatch 8, 1 epoch,
    # 3 PPO steps. Estimate: ~25 s a row (imports + CUDA init ~10 s; a step ~3-4 s, sampling 128 tokens
    # dominating) + ~1-2 min of first-time Triton compilation/autotuning: ~4-5 min. The PPO path never loads the
    # CUDA extension (its ops pick Triton unless HYDRA_KERNELS_CUDA_AUTO=1 or HYDRA_KERNELS_BACKEND=cuda), so it
    # is built first only then (so that no row pays for it). The bench gets what is left of the stage:
    # --budget stops starting rows in time to write the table (no-checkpointing rows run first, later ones are
    # recorded as skipped); one row is killed after 240 s.
    if [ "${HYDRA_KERNELS_CUDA_AUTO:-}" = 1 ] || [ "${HYDRA_KERNELS_BACKEND:-}" = cuda ]; then
        step cuda_build 200 python3 -c "import hydra_kernels.kernels.cuda as c; c.load(); print('cuda extension loaded')"
    fi
    left=$((END - KILL_AFTER - SECONDS))
    step bench_ppo "$left" python3 bench/bench_ppo_variants.py --model llama-1b --out "$W" \
        --budget $((left - 60)) --row-timeout 240
    ;;
  decode)
    step cuda_build 200 python3 -c "import hydra_kernels.kernels.cuda as c; c.load(); print('cuda extension loaded')"
    step bench_decode 540 python3 bench/bench_decode.py --out "$W"   # saves after every row
    ;;
  *)
    echo "unknown stage $stage (tests | bench | lora | logprobs | ppo | decode)"; exit 2 ;;
esac

tar czf "$OUT/gpu_${stage}_${stamp}.tgz" -C "$W" .
echo
echo "################ summary ($stage) -> $OUT/gpu_${stage}_${stamp}.tgz"
cat "$W/status.txt"
grep -h -E "passed|failed" "$W"/gpu_tests.log 2>/dev/null | tail -n 3
for f in "$W"/*.md; do
    [ -e "$f" ] || continue
    echo "--- $(basename "$f")"
    case "$(basename "$f")" in
      ppo_variants_*) sed -n '/^| variant | act. ckpt | params held/,/^$/p' "$f" ;;   # the short table
      decode_*) grep -E "^\|" "$f" ;;
      *) grep -E "MET|MISSED|target|ceiling|\| (yes|NO) \|$" "$f" | head -n 16 ;;
    esac
done
