#!/usr/bin/env bash
# The GPU figures in one go, on a lent CUDA machine (the device tool) or any CUDA host whose
# python3 has torch. Prepare here first with `make gpu-kit` (wheels the machine lacks in .whl/,
# the engine before the GPU work in .base/), then run, carrying .whl and .base:
#     bash bench/gpu_session.sh
# Writes benchmarks.md (five sections: as served, without compile, eager, before/after, prefill chunks) and a log
# into $OUT (or bench/results/).
# PYTHON picks the interpreter (python3); GPU_BENCH_ARGS=--tiny walks the same steps on a CPU.
# STEPS picks some of them (default: all), to spread them over calls of limited length:
#     STEPS="served graphs-only eager" bash bench/gpu_session.sh
#     STEPS="before-after prefill-chunks" bash bench/gpu_session.sh
# (each call adds its sections to the same benchmarks.md when $OUT is kept).
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
step() { echo "== $* ($(date +%T))" | tee -a "$OUT/log.txt"; "$@" 2>&1 | tee -a "$OUT/log.txt"; }
STEPS=${STEPS:-served graphs-only eager before-after prefill-chunks}
want() { [[ " $STEPS " == *" $1 "* ]]; }
want served && step "$PYTHON" bench/gpu_bench.py "${extra[@]}" --output "$report"
want graphs-only && step "$PYTHON" bench/gpu_bench.py "${extra[@]}" --no-compile \
  --section gpu-bench-graphs-only --output "$report"
want eager && step "$PYTHON" bench/gpu_bench.py "${extra[@]}" --no-compile --no-cuda-graphs \
  --section gpu-bench-eager --output "$report"
base=${BASE_TREE:-.base}  # the engine before the GPU work, from `make gpu-kit`
if want before-after && [ -d "$base" ]; then
  step "$PYTHON" bench/compare_revisions.py --base-tree "$base" --rounds 1 --section gpu-before-after \
    --output "$report" -- bench/gpu_bench.py "${extra[@]}"
fi
if [[ " ${extra[*]} " == *" --tiny "* ]]; then chunk_model=(--architecture tiny --device cpu --prompt-words 100)
else chunk_model=(--architecture glm4.1v-9b --device cuda); fi
want prefill-chunks && step "$PYTHON" bench/prefill_chunk_bench.py "${chunk_model[@]}" --chunks 0 2048 512 \
  --repeats 2 --output "$report"
echo "done: copy the sections of $report into docs/benchmarks.md" | tee -a "$OUT/log.txt"
