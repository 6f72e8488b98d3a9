#!/usr/bin/env bash
# One GPU session's checks and measurements, in few device calls (each must end inside 10 minutes).
#
#   bash bench/run_gpu.sh tests    # ~6 min: CUDA JIT build (ptxas report), every @gpu test, the demo on GPU
#   bash bench/run_gpu.sh bench    # ~9 min: HBM/GEMM ceilings + quick sweeps of every benchmark
#   bash bench/run_gpu.sh lora     # full bench_lora_linear sweep (issue 2's table), if device time is left
#   bash bench/run_gpu.sh logprobs # full bench_logprobs sweep (issue 3's tables) + CUDA tuning
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
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stamp=$(date -u +%Y%m%dT%H%MZ)

step() {   # step NAME SECONDS CMD...: run with a time limit, log to $W/NAME.log, remember the status
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date -u +%T), limit ${limit}s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$W/$name.log" 2>&1
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
  *)
    echo "unknown stage $stage (tests | bench | lora | logprobs)"; exit 2 ;;
esac

tar czf "$OUT/gpu_${stage}_${stamp}.tgz" -C "$W" .
echo
echo "################ summary ($stage) -> $OUT/gpu_${stage}_${stamp}.tgz"
cat "$W/status.txt"
grep -h -E "passed|failed" "$W"/gpu_tests.log 2>/dev/null | tail -n 3
for f in "$W"/*.md; do
    [ -e "$f" ] || continue
    echo "--- $(basename "$f")"
    grep -E "MET|MISSED|target|ceiling" "$f" | head -n 12
done
