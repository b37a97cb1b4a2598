#!/usr/bin/env bash
# The GPU figures in one go, on a lent CUDA machine (the device tool) or any CUDA host whose
# python3 has torch. Prepare here first with `make gpu-kit` (wheels the machine lacks in .whl/,
# the engine before the GPU work in .base/; it also walks every step below on the CPU), then run,
# carrying .whl and .base:
#     bash bench/gpu_session.sh
# Writes benchmarks.md, a log and the GPU's clocks (clocks.csv) into $OUT (or bench/results/). The steps, most wanted first,
# each adding its section(s) as soon as it ends (so a call cut off at its time limit keeps them):
#   gpu-tests       the CUDA-only paths against their eager answers (tests/test_cuda_paths.py, tiny model)
#   served          the engine as served (gpu-bench): the issue's targets; also one stream with each step waited
#                   for (GLM4V_OVERLAP_STEPS=false), on the same engine in the same run
#   profile         where a decode step's and a prefill's kernel time goes (decode-profile), the step timed
#                   as kernels alone, replayed back to back and with each token read back; then the same
#                   with the MLP activation stored and with the rotary embedding fused (the two experiments,
#                   in the same process); each kernel's time per call beside what its tuning measured alone
#   defaults-ab     one stream as served and with neither setting that took it to 0.75-0.78 of the bound on an
#                   H200 (2026-11-27: tuning timed by the profiler, the split-KV attention kernels), alternately,
#                   as mlp-ab: whether they hold on this GPU (gpu-defaults-ab)
#   split-ab        1, 8 and 32 sequences as served and with SDPA instead of the split-KV kernels
#                   (--no-split-attention), alternately, as mlp-ab: the kernels' share, most of it for one stream
#                   after the image (gpu-split-attention-ab)
#   tuning-ab       one stream as served and with Inductor's own tuning, timed by events around each launch
#                   (--no-profiled-tuning), alternately, as mlp-ab: the profiler's share (gpu-profiled-tuning-ab)
#   profile-split   the profile after the image's length of context (1400 words), as served and with SDPA instead
#                   of the split-KV kernels, in one process: attention's kernels and time per step either way
#                   (decode-profile-split)
#   tuning-wide-ab  one stream as served and also searching wider (all directions, radius 2): with the timings
#                   right, a wider search may find launches a one-step descent misses (gpu-profiled-wide-tuning-ab)
#   both-ab         one stream as served and with both experiments below (the MLP activation stored, the rotary
#                   embedding fused), alternately, as mlp-ab: their sum is likelier than either alone to stand out of
#                   the spread between compilations in few runs (gpu-experiments-ab)
#   mlp-ab          one stream without and with the MLP activation stored, alternately, each run in a process of its
#                   own that compiles and tunes afresh (AB_ROUNDS rounds, 2 unless set): the stored activation's gain
#                   against the spread between compilations, which one run of each could not tell apart
#                   (gpu-mlp-activation-ab; about a minute per run)
#   rotary-ab       as mlp-ab, for the rotary embedding fused into fewer kernels (compiled_step.FUSED_ROTARY_OPTIONS:
#                   8 Triton kernels a layer instead of 11 for one row) (gpu-rotary-ab)
#   mlp-activation  as served, but each compiled layer stores its MLP's activation once instead of recomputing it
#                   inside the down projection's one-row reduction (gpu-bench-mlp-activation), 128 new tokens
#   profile-long    the profile over a 3000-word prompt: attention's share at an image prompt's length, and
#                   the step's kernels with the FlexAttention experiment and with SDPA instead of the split-KV kernels
#   wider-tuning    as served but coordinate descent searches further (all directions, radius 2) for each kernel's
#                   launch sizes: the q/k/v and output reductions read at 3.2-3.4 TB/s (gpu-bench-wider-tuning)
#   autotune-reductions  as served but Inductor benchmarks every candidate launch size of each reduction before its
#                   coordinate descent (max_autotune_pointwise), instead of descending from one heuristic pick: the
#                   one-row projections' tuned speeds varied 2x between compilations (gpu-bench-autotune-reductions)
#   unfused-qkv     as served but with transformers' three q/k/v projections (gpu-bench-unfused-qkv), 128 new tokens
#   pdl             as served plus Inductor's programmatic dependent launch, Hopper on (gpu-bench-pdl), 128 new tokens
#   combo           as served plus Inductor's combo kernels: independent small kernels (rotary embedding of
#                   queries and keys, the cache writes) launched as one (gpu-bench-combo), 128 new tokens
#   one-row-gemm    as served but coordinate-descent tuning off: a single stream's multiplies stay library GEMMs
#                   (gpu-bench-one-row-gemm), 128 new tokens
#   before-after    the engine before the GPU work vs now, shorter runs (the old engine is slow)
#   prefill-chunks  how long prefill chunks pause running streams, on the real architecture
#   compile         how long torch.compile holds decoding up, on the real architecture
#   compile-restart the same at a first start and at a restart that keeps its compile cache (two processes)
#   eager           no compile, no CUDA graphs (gpu-bench-eager), 128 new tokens
#   graphs-only     CUDA graphs without compile (gpu-bench-graphs-only), 128 new tokens
# STEPS picks some of them, to spread them over calls of limited length:
#     STEPS="served before-after" bash bench/gpu_session.sh
#     STEPS="eager graphs-only" bash bench/gpu_session.sh
# A step that fails is logged and the next one runs; the exit status says whether any failed.
# PYTHON picks the interpreter (python3); GPU_BENCH_ARGS=--tiny walks the same steps on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
read -r -a extra <<<"${GPU_BENCH_ARGS:-}"
has_packages() {  # what the engine needs beyond torch: pydantic-settings, transformers 5.24 or later
  "$PYTHON" -c "import pydantic_settings, transformers as t, sys; sys.exit(tuple(map(int, t.__version__.split('.')[:2])) < (5, 24))" 2>/dev/null
}
if ! has_packages && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/glm4v-site .whl/*.whl
  export PYTHONPATH=/tmp/glm4v-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } | tee "$OUT/log.txt"
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/log.txt"
report="$OUT/benchmarks.md"
# The GPU's clocks, power and temperature twice a second, beside the steps' start times in the log:
# the same kernels have run at different speeds from one run to the next.
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 500 \
    >"$OUT/clocks.csv" 2>&1 &
  clocks_pid=$!
  trap 'kill "$clocks_pid" 2>/dev/null || true' EXIT
fi
failed=()
step() {  # run one step, logged; a failure is noted and the session goes on
  local name=$1; shift
  echo "== $name: $* ($(date +%T))" | tee -a "$OUT/log.txt"
  # Each step tunes and compiles afresh: kernels tuned by an earlier step are not reused.
  if ! TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) "$@" 2>&1 | tee -a "$OUT/log.txt"; then
    echo "== $name FAILED ($(date +%T))" | tee -a "$OUT/log.txt"
    failed+=("$name")
  fi
}
ab() {  # one A/B step: one stream without and with the setting $2, alternately, each run compiling afresh -> section $3
  # (any further arguments go to both sides)
  step "$1" "$PYTHON" bench/compare_revisions.py --setting="$2" --fresh-compile-cache --rounds "$ab_rounds" \
    --section "$3" --output "$report" -- bench/gpu_bench.py --concurrency --decode-tokens 128 "${extra[@]}" "${@:4}"
}
base=${BASE_TREE:-.base}  # the engine before the GPU work, from `make gpu-kit`
if [ -d "$base" ]; then default_steps="gpu-tests served defaults-ab split-ab tuning-ab profile-split tuning-wide-ab profile both-ab mlp-ab rotary-ab mlp-activation autotune-reductions profile-long wider-tuning unfused-qkv pdl combo one-row-gemm before-after compile prefill-chunks eager graphs-only compile-restart"
else default_steps="gpu-tests served defaults-ab split-ab tuning-ab profile-split tuning-wide-ab profile both-ab mlp-ab rotary-ab mlp-activation autotune-reductions profile-long wider-tuning unfused-qkv pdl combo one-row-gemm compile prefill-chunks eager graphs-only compile-restart"; fi  # nothing to compare with
STEPS=${STEPS:-$default_steps}
if [[ " ${extra[*]} " == *" --tiny "* ]]; then
  chunk_model=(--architecture tiny --device cpu --prompt-words 100)
  compile_model=(--architecture tiny --device cpu --layers 2 --long-prompt-words 60)
  profile_model=(--architecture tiny --device cpu --steps 3)
  long_words=100
  image_words=60
  ab_rounds=1
else
  chunk_model=(--architecture glm4.1v-9b --device cuda)
  compile_model=(--architecture glm4.1v-9b --device cuda)
  profile_model=(--architecture glm4.1v-9b --device cuda)
  long_words=3000
  image_words=1400  # about the context after the 1024x1024 image (1,400-odd tokens)
  ab_rounds=${AB_ROUNDS:-2}
fi
short=(--concurrency 8 32 --decode-tokens 64)  # GPU_BENCH_ARGS, after these, may override them
# coordinate descent searching further for each kernel's launch sizes (wider-tuning, tuning-wide-ab)
wide_search=(--compile-option coordinate_descent_check_all_directions=true --compile-option coordinate_descent_search_radius=2)
for name in $STEPS; do
  case $name in
    gpu-tests) step "$name" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda_paths.py ;;
    before-after)
      if [ -d "$base" ]; then
        step "$name" "$PYTHON" bench/compare_revisions.py --base-tree "$base" --rounds 1 --section gpu-before-after \
          --output "$report" -- bench/gpu_bench.py "${short[@]}" "${extra[@]}"
      else echo "== $name skipped: no $base (make gpu-kit)" | tee -a "$OUT/log.txt"; failed+=("$name"); fi ;;
    prefill-chunks) step "$name" "$PYTHON" bench/prefill_chunk_bench.py "${chunk_model[@]}" --chunks 0 2048 512 \
      --repeats 2 --output "$report" ;;
    compile-restart) step "$name" "$PYTHON" bench/compile_bench.py "${compile_model[@]}" --restart --output "$report" ;;
    compile) step "$name" "$PYTHON" bench/compile_bench.py "${compile_model[@]}" --output "$report" ;;
    profile) step "$name" "$PYTHON" bench/decode_profile.py "${profile_model[@]}" --store-mlp-activation \
      --fuse-rotary --output "$report" ;;
    profile-long) step "$name" "$PYTHON" bench/decode_profile.py "${profile_model[@]}" --flex --sdpa-attention \
      --prompt-words "$long_words" --section decode-profile-long --output "$report" ;;
    eager) step "$name" "$PYTHON" bench/gpu_bench.py --decode-tokens 128 "${extra[@]}" --no-compile --no-cuda-graphs \
      --section gpu-bench-eager --output "$report" ;;
    graphs-only) step "$name" "$PYTHON" bench/gpu_bench.py --decode-tokens 128 "${extra[@]}" --no-compile \
      --section gpu-bench-graphs-only --output "$report" ;;
    unfused-qkv) step "$name" "$PYTHON" bench/gpu_bench.py --concurrency 8 --decode-tokens 128 "${extra[@]}" \
      --no-fused-qkv --section gpu-bench-unfused-qkv --output "$report" ;;
    pdl) step "$name" "$PYTHON" bench/gpu_bench.py --concurrency 8 --decode-tokens 128 "${extra[@]}" \
      --compile-option triton.enable_pdl=true --section gpu-bench-pdl --output "$report" ;;
    combo) step "$name" "$PYTHON" bench/gpu_bench.py --concurrency 8 --decode-tokens 128 "${extra[@]}" \
      --compile-option combo_kernels=true --compile-option benchmark_combo_kernel=true --section gpu-bench-combo \
      --output "$report" ;;
    one-row-gemm) step "$name" "$PYTHON" bench/gpu_bench.py --concurrency 8 --decode-tokens 128 "${extra[@]}" \
      --compile-option coordinate_descent_tuning=false --section gpu-bench-one-row-gemm --output "$report" ;;
    autotune-reductions) step "$name" "$PYTHON" bench/gpu_bench.py --concurrency 8 --decode-tokens 128 "${extra[@]}" \
      --compile-option max_autotune_pointwise=true --section gpu-bench-autotune-reductions --output "$report" ;;
    wider-tuning) step "$name" "$PYTHON" bench/gpu_bench.py --concurrency 8 --decode-tokens 128 "${extra[@]}" \
      "${wide_search[@]}" --section gpu-bench-wider-tuning --output "$report" ;;
    served) step "$name" "$PYTHON" bench/gpu_bench.py "${extra[@]}" --output "$report" ;;
    defaults-ab) ab "$name" "--no-profiled-tuning --no-split-attention" gpu-defaults-ab ;;
    split-ab) ab "$name" --no-split-attention gpu-split-attention-ab --concurrency 8 32 ;;
    tuning-ab) ab "$name" --no-profiled-tuning gpu-profiled-tuning-ab ;;
    profile-split) step "$name" "$PYTHON" bench/decode_profile.py "${profile_model[@]}" --sdpa-attention \
      --prompt-words "$image_words" --section decode-profile-split --output "$report" ;;
    tuning-wide-ab) ab "$name" "${wide_search[*]}" gpu-profiled-wide-tuning-ab ;;
    mlp-ab) ab "$name" --store-mlp-activation gpu-mlp-activation-ab ;;
    both-ab) ab "$name" "--store-mlp-activation --fuse-rotary" gpu-experiments-ab ;;
    rotary-ab) ab "$name" --fuse-rotary gpu-rotary-ab ;;
    mlp-activation) step "$name" "$PYTHON" bench/gpu_bench.py --concurrency 8 --decode-tokens 128 "${extra[@]}" \
      --store-mlp-activation --section gpu-bench-mlp-activation --output "$report" ;;
    *) echo "== unknown step $name (known: gpu-tests served defaults-ab split-ab tuning-ab profile-split tuning-wide-ab profile both-ab mlp-ab rotary-ab mlp-activation autotune-reductions compile-restart pdl combo one-row-gemm unfused-qkv profile-long wider-tuning before-after compile prefill-chunks eager graphs-only)" \
      | tee -a "$OUT/log.txt"; failed+=("$name") ;;
  esac
done
echo "done: copy the sections of $report into docs/benchmarks.md" | tee -a "$OUT/log.txt"
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}" | tee -a "$OUT/log.txt"; exit 1; fi
