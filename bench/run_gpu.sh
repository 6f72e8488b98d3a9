#!/usr/bin/env bash
# A GPU session's checks and measurements, each stage one device call (a command ends inside 10 minutes).
#
#   bash bench/run_gpu.sh          # stage `one`: the one call that decides the most, inside 540 s wall (below)
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
# Stage `one`, in this order, each step with its own share of the time (seconds, the SHARE_* below), cut to what is
# left before 540 s; a step with no time left is skipped, and everything is packed again after every step:
#   prepare      device, versions, date (env.json); the Triton configs left out of autotuning: those that spill
#                heavily or do not build in the offline sm_90 builds (bench/results/triton_sm90_builds, read by
#                hydra_kernels through HYDRA_KERNELS_TRITON_SKIP_CONFIGS; nothing else changes)
#   1. correctness: cuda_build (the csrc/ extension, in the background) while tests_triton runs the GPU tests of
#      the Triton kernels and the patched model's bf16 parity with peft; then tests_cuda, a short subset of the
#      CUDA parity tests. Both lists: bench/gpu_tests.txt.
#   2. the decisive numbers: lora (HBM copy + bf16 GEMM ceilings; lora_linear fwd+bwd at 4096x4096 r=64, 2048 and
#      8192 rows, vs peft-style and the base GEMM; 2 streams no-grad at 16 and 64 rows/stream, Triton and CUDA, vs
#      two passes), logprobs (from logits at a 151936 vocab, Triton and CUDA, vs eager: issue 4's 85% of HBM),
#      linear_logprobs (LM head fused, 2 streams, 3584x152064, 4096 tokens, vs eager fp32, torch.compile, Liger if
#      its wheel is carried, chunked), ppo (one PPO step, Hydra-PPO vs LoRA-PPO at llama-1b: peak memory and
#      time), grpo (Hydra-GRPO vs a separate reference forward: bench/bench_grpo.py, skipped until it exists),
#      memory (issue 16's ledger against the GPU: bench/bench_memory.py);
#   3. what time is left: sweep_lora, sweep_logprobs, tune_cuda_lora.
# Triton compilation and autotuning happen inside the steps that need them, so their time is counted there; the
# compiled kernels (~/.triton/cache) and autotuning results (TRITON_CACHE_AUTOTUNING=1) are reused by later
# steps, and the CUDA extension is built once into ~/.cache/hydra_kernels. A later script (GRPO, memory) is run
# with `--out DIR --budget SECONDS` and writes JSON (with `targets`, see bench/gpu_call.py) + Markdown into DIR.
#
# Everything a stage writes (JSON + Markdown results, logs, junit XML, env.json, summary.json/.md) is packed into
# $OUT/gpu_<stage>_<date>.tgz (the device tool returns at most 8 files), again after every step of stage `one`,
# so a later step's time-out or the call's end cannot lose what an earlier step measured; stage `one` also leaves
# $OUT/gpu_one_summary.md and prints the summary table last (each target MET / MISSED / NOT RUN, with its issue).
# Unpack the tarball into bench/results/ and commit it. Never changes the card's settings.
set -uo pipefail
stage=${1:-one}
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
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
stamp=$(date -u +%Y%m%dT%H%MZ)
TARBALL="$OUT/gpu_${stage}_${stamp}.tgz"

# ------------------------------------------------------------------------------------------------ time keeping
# The device call is killed at 600 s. Every step's limit is cut to what is left before END seconds of this script,
# less the KILL_AFTER grace that `timeout` gives a process after its SIGINT, so the last step ends, and the tar and
# the summary run, inside the call. A step with under 5 s left is skipped. HK_RUN_GPU_TIME_SCALE (percent, tests
# only) scales every nominal time (END, KILL_AFTER, the shares) alike.
if [ "$stage" = one ]; then default_end=540; default_kill=15; else default_end=575; default_kill=20; fi
SCALE=${HK_RUN_GPU_TIME_SCALE:-100}
ms_of() { echo $(( $1 * 10 * SCALE )); }                      # nominal seconds -> scaled milliseconds
END_MS=$(ms_of "${HK_RUN_GPU_END:-$default_end}")
KILL_MS=$(ms_of "${HK_RUN_GPU_KILL_AFTER:-$default_kill}")
MIN_MS=$(ms_of 5)
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $(( t / 1000 )); }
T0=$(now_ms)
secs() { printf '%d.%03d' $(( $1 / 1000 )) $(( $1 % 1000 )); }
left_ms() { echo $(( END_MS - KILL_MS - ($(now_ms) - T0) )); }
limit_ms() {                                                    # limit_ms SHARE: min(share, what is left)
    local share left
    share=$(ms_of "$1"); left=$(left_ms)
    echo $(( share < left ? share : left ))
}
record() {   # record NAME STATUS START_MS END_MS LIMIT_MS [NOTE]: status.txt (one line a step) + steps.tsv (times)
    local name=$1 status=$2 note=${6:-}
    if [ "${status%%=*}" = rc ]; then echo "$name $status" >> "$W/status.txt"
    else echo "$name $status${note:+ ($note)}" >> "$W/status.txt"; fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(secs $(( $3 - T0 )))" "$(secs $(( $4 - $3 )))" \
        "$(secs "$5")" "$note" >> "$W/steps.tsv"
}
skip() {     # skip NAME WHY
    local t; t=$(now_ms)
    echo "=== $1 skipped: $2"
    record "$1" skipped "$t" "$t" 0 "$2"
}
step() {     # step NAME SHARE CMD...: run with a time limit, log to $W/NAME.log, record the status
    local name=$1 lim t1 rc; shift
    lim=$(limit_ms "$1"); shift
    if [ "$lim" -lt "$MIN_MS" ]; then skip "$name" "no time left"; return 0; fi
    echo "=== $name (+$(secs $(( $(now_ms) - T0 )))s, limit $(secs "$lim")s): $*"
    t1=$(now_ms)
    timeout --signal=INT --kill-after="$(secs "$KILL_MS")" "$(secs "$lim")" "$@" > "$W/$name.log" 2>&1
    rc=$?
    tail -n 15 "$W/$name.log"
    record "$name" "rc=$rc" "$t1" "$(now_ms)" "$lim"
    pack
    return 0
}
declare -A BG_PID BG_T1 BG_LIM
bg_step() {  # bg_step NAME SHARE CMD...: as step, in the background; bg_wait NAME collects it
    local name=$1 lim; shift
    lim=$(limit_ms "$1"); shift
    if [ "$lim" -lt "$MIN_MS" ]; then skip "$name" "no time left"; return 0; fi
    echo "=== $name in the background (+$(secs $(( $(now_ms) - T0 )))s, limit $(secs "$lim")s): $*"
    BG_T1[$name]=$(now_ms); BG_LIM[$name]=$lim
    ( timeout --signal=INT --kill-after="$(secs "$KILL_MS")" "$(secs "$lim")" "$@" > "$W/$name.log" 2>&1
      echo "$? $(now_ms)" > "$W/$name.rc" ) &
    BG_PID[$name]=$!
}
BG_RC=
bg_wait() {  # bg_wait NAME: wait for a background step (its own limit bounds the wait); its rc -> BG_RC
    local name=$1
    if [ -z "${BG_PID[$name]:-}" ]; then BG_RC=skipped; return 0; fi
    wait "${BG_PID[$name]}"
    local rc_end t2
    rc_end=$(cat "$W/$name.rc" 2>/dev/null || echo "1 $(now_ms)")
    BG_RC=${rc_end% *}; t2=${rc_end#* }
    echo "=== $name done (rc=$BG_RC, +$(secs $(( t2 - T0 )))s)"
    tail -n 15 "$W/$name.log"
    record "$name" "rc=$BG_RC" "${BG_T1[$name]}" "$t2" "${BG_LIM[$name]}"
    unset "BG_PID[$name]"
    pack
}
pack() {     # the results so far -> $TARBALL (written aside, then renamed: a kill mid-tar keeps the last one)
    if [ "$stage" = one ]; then
        python3 bench/gpu_call.py summary "$W" --tarball "$(basename "$TARBALL")" --quiet > "$W/summary.log" 2>&1
        cp "$W/summary.md" "$OUT/gpu_one_summary.md" 2>/dev/null
    fi
    tar czf "$TARBALL.part" -C "$W" . 2>/dev/null && mv "$TARBALL.part" "$TARBALL"
}

# ------------------------------------------------------------------------------------------------ the stages
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    git log -1 --format='commit %H %cd' 2>/dev/null || true
    date -u
} > "$W/env.txt" 2>&1
cat "$W/env.txt"

# Shares of stage `one` (nominal seconds; the steps' order is the priority). They add up to ~490 s when every step
# uses all of its share, so the sweeps get ~30 s at least and whatever the earlier steps left.
SHARE_PREPARE=20 SHARE_CUDA_BUILD=200 SHARE_TESTS_TRITON=120 SHARE_TESTS_CUDA=45 SHARE_LORA=50 SHARE_LOGPROBS=25
SHARE_LINEAR=70 SHARE_PPO=160 SHARE_GRPO=60 SHARE_MEMORY=30 SHARE_REST=600
tests_of() { awk -v g="$1" '$1 == g { print $2 }' bench/gpu_tests.txt; }
pytest_flags() {   # pytest flags for a correctness step: xdist workers and a per-test limit where installed
    local flags=(-q -p no:cacheprovider -rfE)
    if [ "${HK_GPU_TEST_WORKERS:-4}" != 0 ] && python3 -c "import xdist" 2>/dev/null; then
        flags+=(-n "${HK_GPU_TEST_WORKERS:-4}")
    fi
    if python3 -c "import pytest_timeout" 2>/dev/null; then flags+=(--timeout 120); fi
    echo "${flags[@]}"
}

case "$stage" in
  one)
    step prepare "$SHARE_PREPARE" python3 bench/gpu_call.py prepare --out "$W"
    if [ -s "$W/skip_configs.jsonl" ]; then export HYDRA_KERNELS_TRITON_SKIP_CONFIGS=$W/skip_configs.jsonl; fi
    # 1. correctness
    bg_step cuda_build "$SHARE_CUDA_BUILD" python3 -c "import hydra_kernels.kernels.cuda as c; c.load(); print('cuda extension loaded')"
    mapfile -t triton_tests < <(tests_of triton)
    mapfile -t cuda_tests < <(tests_of cuda)
    # shellcheck disable=SC2046
    step tests_triton "$SHARE_TESTS_TRITON" python3 -m pytest $(pytest_flags) --junitxml="$W/tests_triton.xml" \
        "${triton_tests[@]}"
    bg_wait cuda_build
    if [ "$BG_RC" = 0 ]; then
        # shellcheck disable=SC2046
        step tests_cuda "$SHARE_TESTS_CUDA" python3 -m pytest $(pytest_flags) --junitxml="$W/tests_cuda.xml" \
            "${cuda_tests[@]}"
    else
        skip tests_cuda "cuda_build did not succeed ($BG_RC): see cuda_build.log"
    fi
    # 2. the decisive numbers
    step lora "$SHARE_LORA" python3 bench/bench_lora_linear.py --shapes 4096x4096 --ranks 64 \
        --cases actor_fwd_bwd,base_actor --case-rows actor_fwd_bwd=2048,8192 --case-rows base_actor=16,64 \
        --providers fused,cuda,base,peft,separate --out "$W" --tag one
    step logprobs "$SHARE_LOGPROBS" python3 bench/bench_logprobs.py --section logits --vocab 151936 \
        --tokens 16384 --impls ours cuda eager --out "$W"
    step linear_logprobs "$SHARE_LINEAR" python3 bench/bench_logprobs.py --section linear \
        --linear-shapes 3584x152064 --linear-tokens 4096 --models 2 --impls ours eager liger chunked compile \
        --out "$W"
    # PPO: the bench stops starting rows in time to write its table (--budget: 20 s less than the step's limit);
    # a row may take 60% of that (a first row also pays for most Triton compilation and autotuning).
    lim=$(limit_ms "$SHARE_PPO"); budget=$(( lim - $(ms_of 20) )); budget=$(( budget > 0 ? budget : 0 ))
    step ppo "$SHARE_PPO" python3 bench/bench_ppo_variants.py --model llama-1b --variants lora hydra \
        --checkpointing off --steps 2 --budget "$(secs "$budget")" --row-timeout "$(secs $(( budget * 6 / 10 )))" \
        --out "$W" --tag one
    for slot in grpo memory; do
        script=bench/bench_$slot.py
        share_var=SHARE_${slot^^}
        if [ -e "$script" ]; then
            lim=$(limit_ms "${!share_var}"); budget=$(( lim - $(ms_of 10) )); budget=$(( budget > 0 ? budget : 0 ))
            step "$slot" "${!share_var}" python3 "$script" --out "$W" --budget "$(secs "$budget")"
        else
            skip "$slot" "not available: $script not built yet"
        fi
    done
    # 3. what time is left
    step sweep_lora "$SHARE_REST" python3 bench/bench_lora_linear.py --quick --no-compile --out "$W" --tag sweep
    step sweep_logprobs "$SHARE_REST" python3 bench/bench_logprobs.py --section all --quick --out "$W"
    step tune_cuda_lora "$SHARE_REST" python3 bench/tune_cuda_lora.py --out "$W"
    ;;
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
    left=$(( $(left_ms) / 1000 ))
    step bench_ppo "$left" python3 bench/bench_ppo_variants.py --model llama-1b --out "$W" \
        --budget $((left - 60)) --row-timeout 240
    ;;
  decode)
    step cuda_build 200 python3 -c "import hydra_kernels.kernels.cuda as c; c.load(); print('cuda extension loaded')"
    step bench_decode 540 python3 bench/bench_decode.py --out "$W"   # saves after every row
    ;;
  *)
    echo "unknown stage $stage (one | tests | bench | lora | logprobs | ppo | decode)"; exit 2 ;;
esac

pack
echo
echo "################ summary ($stage) -> $TARBALL"
cat "$W/status.txt"
if [ "$stage" = one ]; then
    # The table comes last: the device tool returns the end of the output.
    python3 bench/gpu_call.py summary "$W" --tarball "$TARBALL" || cat "$W/summary.md" 2>/dev/null
    exit 0
fi
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
