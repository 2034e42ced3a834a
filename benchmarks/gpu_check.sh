#!/usr/bin/env bash
# The one prepared run for the GPU machine (see ../shared/docs/ENVIRONMENT.md): build for the
# card there, run the GPU tests, the op benchmarks (batch 32, the five ResNet-50 stage shapes;
# float32, bfloat16, bfloat16 channels_last), the quick MA-Net training-step benchmark (batch
# 32, bf16 autocast, channels_last, eager reference vs native vs triton, 10 steps), then plots
# and a markdown summary; everything lands under $OUT and the short summary is printed last.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
#
# Time: the whole script keeps within GPU_CHECK_BUDGET_S seconds (default 450, for the ~8
# minutes a run may take). Each step runs under `timeout` with what is left minus a reserve for
# the steps after it; a step with under 20 s left is skipped and says so. The op benchmarks stop
# starting new cases at their own --time-budget, so a slow compile costs shapes, not the CSV.
# If time is left after the training step (>= 100 s), bfloat16 channels_last runs once more
# with compile-max (torch.compile mode="max-autotune-no-cudagraphs") among the providers.
# Overrides: GPU_CHECK_OPS (default mutex_attention,mab,fab), PYTHON (default python3, else
# python), TORCH_CUDA_ARCH_LIST, MAX_JOBS, GPU_CHECK_STEPS (default tests,ops,profile,train,max: which
# steps run after the build; a second, shorter call after a fix names fewer), GPU_CHECK_PYTEST
# (extra pytest arguments, e.g. "-k mab" to rerun what failed), GPU_CHECK_COMMIT (the commit
# the tree is, for the results: the device's copy of .git can be a stale snapshot).
# The GPU tests run in 8 pytest-xdist workers where xdist is installed (Triton's compiles and
# the float64 CPU oracle are CPU work), each test under a 120 s timeout where pytest-timeout is.
# GPU_CHECK_DRY_RUN=1 rehearses the script on a CPU machine: no build (the extension must be
# built already), CPU tensors, tiny shapes and steps; it checks the plumbing, not the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
# Everything is written to a scratch folder and packed into $OUT/gpu_results.tar.gz after each
# step and on exit, with the few files worth reading at once beside it (the device tool returns
# at most 8 files).
RESULTS=${OUT:-./gpu_results}
mkdir -p "$RESULTS"
OUT=$(mktemp -d)
pack() {
  tar -C "$OUT" -czf "$RESULTS/gpu_results.tar.gz" . 2>/dev/null
  for f in steps.txt cuda-tests.log ops.csv train_step.csv profile.txt plots/summary.md; do
    [ -f "$OUT/$f" ] && cp "$OUT/$f" "$RESULTS/"
  done
}
trap pack EXIT
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FORCE_CUDA=1
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -n "${GPU_CHECK_COMMIT:-}" ] && export MUTEX_ATTN_COMMIT=$GPU_CHECK_COMMIT
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
STEPS_WANTED=",${GPU_CHECK_STEPS:-tests,ops,profile,train,max},"
wanted() { [[ "$STEPS_WANTED" == *",$1,"* ]]; }
OPS=${GPU_CHECK_OPS:-mutex_attention,mab,fab}
DEVICE=cuda BATCH=32 SIZE=224 STEPS=10 WARMUP=3 REPS=30
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  DEVICE=cpu BATCH=2 SIZE=32 STEPS=1 WARMUP=1 REPS=3
  nvidia-smi() { echo "(dry run: no nvidia-smi)"; }
fi
status=0
: > "$OUT/steps.txt"

step() { echo "== $* ($(date +%T), ${SECONDS}s of ${BUDGET}s)"; }
# seconds a step may take: at most $1, leaving $2 for the steps after it
limit() { local l=$(( BUDGET - SECONDS - $2 )); [ "$l" -gt "$1" ] && l=$1; echo "$l"; }
# run NAME SECONDS LOG CMD...: CMD under timeout into LOG; records rc and duration in steps.txt
run() {
  local name=$1 secs=$2 log=$3; shift 3
  if [ "$secs" -lt 20 ]; then
    echo "SKIPPED $name: only ${secs}s left in the budget" | tee -a "$OUT/steps.txt"; status=1; return 1
  fi
  local t0=$SECONDS rc=0
  timeout "$secs" "$@" > "$log" 2>&1 || rc=$?
  local what="ok"; [ "$rc" -eq 124 ] && what="TIMED OUT after ${secs}s"; [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && what="FAILED (rc $rc)"
  echo "$name: $what in $((SECONDS - t0))s (limit ${secs}s)" | tee -a "$OUT/steps.txt"
  pack  # after every step: a kill of the whole call (rc 137) then loses only the step in flight
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

step environment
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo "${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
  timeout 60 $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU visible')"
  timeout 60 $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null; } | tee "$OUT/env.txt"

step "build (sm_${TORCH_CUDA_ARCH_LIST/./}, in place, against the torch already installed)"
if [ "$DEVICE" = cpu ]; then
  echo "dry run: no build" > "$OUT/build.log"
elif ! run build "$(limit 240 180)" "$OUT/build.log" $PY setup.py build_ext --inplace; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; cat "$OUT/steps.txt"; exit 1
fi
tail -3 "$OUT/build.log"
timeout 60 $PY -c "import mutex_attn as ma; print('backends on $DEVICE:', ma.available_backends('$DEVICE'))" | tee -a "$OUT/env.txt"

if wanted tests; then
  step "GPU tests (tests/test_cuda.py, and tests/test_triton.py on the GPU)"
  xdist=(); $PY -c "import xdist" 2>/dev/null && [ "$DEVICE" = cuda ] && xdist=(-n 8)
  per_test=(); $PY -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120)
  OMP_NUM_THREADS=2 run "GPU tests" "$(limit 200 170)" "$OUT/cuda-tests.log" $PY -m pytest -q -rfE tests/test_cuda.py tests/test_triton.py \
    -p no:cacheprovider "${xdist[@]}" "${per_test[@]}" --durations=10 --junitxml "$OUT/cuda-tests.xml" \
    ${GPU_CHECK_PYTEST:-}
  grep -E "^(FAILED|ERROR)" "$OUT/cuda-tests.log" | head -40
  tail -15 "$OUT/cuda-tests.log"
fi

if wanted ops; then
  step "op benchmark (batch 32, five ResNet-50 stage shapes, full = forward + backward)"
  after=15; wanted profile && after=$((after + 45)); wanted train && after=$((after + 60))
  # front first: a config gets up to 75 s of what the later steps leave; one with under 45 s
  # is skipped (its first torch.compile alone takes ~30 s)
  for cfg in "float32 contiguous" "bfloat16 contiguous" "bfloat16 channels_last"; do
    set -- $cfg
    secs=$(limit 75 $after)
    if [ "$secs" -lt 45 ]; then
      echo "SKIPPED ops $1 $2: ${secs}s left, under the 45 s a config needs" | tee -a "$OUT/steps.txt"; status=1; continue
    fi
    run "ops $1 $2" "$secs" "$OUT/bench_${1}_${2}.txt" $PY benchmarks/bench_ops.py --device $DEVICE \
      --batch $BATCH --size $SIZE --shapes stages --ops "$OPS" --providers reference,compile,native,triton,floor \
      --dtype "$1" --layout "$2" --reps $REPS --time-budget $((secs > 35 ? secs - 25 : 10)) --csv "$OUT/ops.csv"
  done
fi

if wanted profile; then
  step "profile (where a stage-1 step's time goes: wall vs kernel time, launches)"
  rest=15; wanted train && rest=75
  run profile "$(limit 45 $rest)" "$OUT/profile.txt" $PY benchmarks/profile_op.py \
    --device $DEVICE --shape "$BATCH,256,$((SIZE / 4)),$((SIZE / 4))" --dtype float32
  cat "$OUT/profile.txt"
fi

if wanted train; then
  step "training step (MA-Net ResNet-50, batch 32, 224 px, bf16 autocast, channels_last, eager)"
  run "train step" "$(limit 100 25)" "$OUT/train_step.txt" $PY benchmarks/bench_train_step.py --device $DEVICE \
    --batch $BATCH --size $SIZE --amp bf16 --channels-last --backends reference,native,triton --no-compile \
    --steps $STEPS --warmup $WARMUP --csv "$OUT/train_step.csv"
fi

if wanted max && [ $(( BUDGET - SECONDS - 25 )) -ge 100 ]; then
  step "op benchmark with compile-max (bfloat16 channels_last)"
  secs=$(limit 240 25)
  run "ops compile-max" "$secs" "$OUT/bench_bfloat16_channels_last_max.txt" $PY benchmarks/bench_ops.py \
    --device $DEVICE --batch $BATCH --size $SIZE --shapes stages --ops "$OPS" \
    --providers reference,compile,compile-max,native,triton,floor --dtype bfloat16 --layout channels_last \
    --reps $REPS --time-budget $((secs - 30)) --csv "$OUT/ops.csv"
elif wanted max; then
  echo "compile-max run left out: under 100 s left" | tee -a "$OUT/steps.txt"
fi

step plots
[ -s "$OUT/ops.csv" ] && run plots "$(limit 60 0)" "$OUT/plot.log" $PY benchmarks/plot.py --ops-csv "$OUT/ops.csv" \
  --train-csv "$OUT/train_step.csv" --out "$OUT/plots" --summary --commit all

step summary
cat "$OUT/env.txt"
cat "$OUT/steps.txt"
grep -E "passed|failed|error" "$OUT/cuda-tests.log" 2>/dev/null | tail -2
grep -hE "^(FAILED|skipped provider|skipped backend|time budget|Traceback|[A-Za-z]*Error)" "$OUT"/bench_*.txt \
  "$OUT/train_step.txt" 2>/dev/null | sort | uniq | head -20
if [ -s "$OUT/plots/summary.md" ]; then
  cat "$OUT/plots/summary.md"
else  # no summary from plot.py: the benchmark tables themselves
  for f in "$OUT"/bench_*.txt "$OUT/train_step.txt"; do
    [ -f "$f" ] && { echo "-- $(basename "$f" .txt)"; grep -E "^(op |mutex_attention|mab|fab|model |manet|resnet50)" "$f"; }
  done
fi
echo "total ${SECONDS}s; exit status $status"
exit $status
