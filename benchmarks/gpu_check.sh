#!/usr/bin/env bash
# The one prepared run for the GPU machine (see ../shared/docs/ENVIRONMENT.md): build for the
# card there, run the GPU tests, run the quick benchmarks; everything lands under $OUT and a
# short table is printed last. Budget: ~8 minutes on an H100.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FORCE_CUDA=1
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
status=0

step() { echo "== $* ($(date +%T))"; }

step environment
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git rev-parse --short HEAD 2>/dev/null
  $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null; } | tee "$OUT/env.txt"

step "build (sm_${TORCH_CUDA_ARCH_LIST/./}, in place, against the torch already installed)"
if ! (time $PY setup.py build_ext --inplace) > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
tail -3 "$OUT/build.log"
$PY -c "import mutex_attn as ma; print('backends on cuda:', ma.available_backends('cuda'))" | tee -a "$OUT/env.txt"

step "GPU tests (pytest -m cuda)"
timeout 300 $PY -m pytest -q -m cuda tests/ -p no:cacheprovider --durations=10 \
  --junitxml "$OUT/cuda-tests.xml" > "$OUT/cuda-tests.log" 2>&1 || status=1
tail -15 "$OUT/cuda-tests.log"

step "op benchmark (batch 32, five ResNet-50 stage shapes)"
for cfg in "float32 contiguous" "bfloat16 contiguous" "bfloat16 channels_last"; do
  set -- $cfg
  timeout 150 $PY benchmarks/bench_ops.py --device cuda --batch 32 --shapes stages --dtype "$1" \
    --layout "$2" --reps 30 --csv "$OUT/ops.csv" > "$OUT/bench_${1}_${2}.txt" 2>&1 || status=1
done

step summary
cat "$OUT/env.txt"
grep -E "passed|failed|error" "$OUT/cuda-tests.log" | tail -2
for f in "$OUT"/bench_*.txt; do echo "-- $(basename "$f" .txt)"; grep -E "^(op |mutex_attention|mab|Traceback|[A-Za-z]*Error)" "$f"; done
exit $status
