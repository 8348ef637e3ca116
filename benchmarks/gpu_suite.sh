#!/usr/bin/env bash
# The one script to run on a GPU machine (see benchmarks/README.md), within SUITE_BUDGET_S seconds (default 480):
#   1. kernel correctness on CUDA against float64 at real sizes (pooling, contrastive, Matryoshka, layer exits);
#   2. kernel benchmarks: time + peak memory vs the PyTorch reference and the peers whose wheels are carried;
#   3. the training-step ablation (Qwen3-0.6B dimensions), with whatever time is left as its --budget-s;
#   4. PNG plots and a summary table (printed last), with each training-step row's model-FLOPs and executed-FLOPs MFU.
# Two CPU-only steps run in the background beside steps 1-3 (they need no GPU time): the FLOP count of every
# training-step row (bench_train_step.py --flops, on the meta device) and the compile check of every Triton kernel
# configuration (bench_compile.py, when present; its failure is recorded and the suite goes on).
# Every step runs under `timeout`; a failed or timed-out step is recorded and the suite goes on.
#
# Usage: bash benchmarks/gpu_suite.sh [--quick] [--dry-run] [--only STEP,...]
#   --quick    smallest sizes of every benchmark (a smoke test on the GPU, about a minute)
#   --dry-run  no GPU: every step in its CPU mode (--cpu, --quick for the timings), to prove the plumbing
#   --only     run only these steps (pooling_check, pooling_bench, contrastive_check, contrastive_bench,
#              matryoshka_check, matryoshka_bench, layer_exits_check, layer_exits_bench, train_step,
#              train_step_flops, compile), e.g. to rerun the training step alone in a short GPU window
# Environment:
#   RESULTS_ROOT  results go to $RESULTS_ROOT/<device>/<yyyy-mm-dd>/ (default benchmarks/results; dry run: a
#                 folder under ${TMPDIR:-/tmp})
#   OUT           when set (the device tool sets it): also write $OUT/results.tar.gz (the whole results folder, as
#                 <device>/<date>/...), $OUT/summary.md and the PNGs, so that everything comes back in a few files
#   WHEELS        folder of carried wheels installed into a private site dir (default .whl)
#   PYTHON        the interpreter (default python3)
#   SUITE_BUDGET_S  total seconds for all steps (default 480)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SUITE_BUDGET_S=${SUITE_BUDGET_S:-480}
suite_start=$SECONDS

dry_run=0
quick=()
only=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --quick) quick=(--quick) ;;
    --only) only=",${2:?--only needs a comma-separated list of steps},"; shift ;;
    *) echo "gpu_suite: unknown argument $1 (use --quick, --dry-run, --only STEP,...)"; exit 2 ;;
  esac
  shift
done

if [ "$dry_run" = 1 ]; then
  device=cpu-dry-run
  cpu=(--cpu)
  quick=(--quick)
  export TRITON_INTERPRET=1  # the Triton paths of the checks run through the interpreter
  RESULTS_ROOT=${RESULTS_ROOT:-${TMPDIR:-/tmp}/f2llm-suite-dry-run}
else
  device=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null) || {
    echo "gpu_suite: no CUDA device visible to $PY (torch.cuda.get_device_name failed); --dry-run runs on CPU"
    exit 2
  }
  cpu=()
  RESULTS_ROOT=${RESULTS_ROOT:-benchmarks/results}
fi
run_dir="$device/$(date +%F)"
RESULTS="$RESULTS_ROOT/$run_dir"
mkdir -p "$RESULTS"
rm -f "$RESULTS/steps.txt"

# Carried wheels (liger-kernel, inf-cl, cut-cross-entropy, ...) go to a private site dir: nothing in the image
# is replaced. A dry run leaves the environment as it is.
if [ "$dry_run" = 0 ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/f2llm-wheels "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/f2llm-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
# f2llm itself without pip: kernels/ is the package f2llm.kernels.
site=$(mktemp -d "${TMPDIR:-/tmp}/f2llm-src.XXXXXX")
cp -r f2llm "$site/" && cp -r kernels "$site/f2llm/kernels"
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  $PY -m pip list 2>/dev/null | grep -iE '^(transformers|datasets|pyarrow|liger|deepspeed|inf.cl|cut.cross|sentence|flash|matplotlib)' || true
} | tee "$RESULTS/environment.txt"

status=0
remaining() { echo $((SUITE_BUDGET_S - (SECONDS - suite_start))); }
# step NAME LIMIT_S COMMAND...: run under `timeout` (the smaller of LIMIT_S and the suite's time left), log to
# $RESULTS/NAME.log, append "NAME EXIT SECONDS LIMIT" to steps.txt, remember failures, keep going.
step() {
  local name=$1 limit=$2; shift 2
  [ -z "$only" ] || [[ $only == *",$name,"* ]] || return 0
  local left; left=$(remaining)
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped, ${left} s left of SUITE_BUDGET_S=$SUITE_BUDGET_S"
    echo "$name skipped 0 $limit" >> "$RESULTS/steps.txt"
    status=1
    return
  fi
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
  echo "$name $rc $((SECONDS - t0)) $limit" >> "$RESULTS/steps.txt"
}

# bg_step NAME LIMIT COMMAND...: a step in the background, its output in its log only: the CPU-only steps, run
# beside the GPU steps so that they take none of the suite's time. wait_bg waits for them (each has its timeout).
bg_pids=()
bg_step() {
  local name=$1
  [ -z "$only" ] || [[ $only == *",$name,"* ]] || return 0
  step "$@" >/dev/null 2>&1 &
  bg_pids+=($!)
  echo "== $name: started in the background (log: $RESULTS/$name.log)"
}
wait_bg() {
  local pid
  for pid in "${bg_pids[@]}"; do wait "$pid"; done
}

REPORT_RESERVE_S=30  # plots, summary and tarball at the end (they have their own timeouts)
# Executed FLOPs of every training-step row (meta device, no GPU), for the executed-FLOPs MFU of the summary.
if [ "$dry_run" = 1 ]; then flops=(--flops --model tiny --gc-batches 8); else flops=(--flops --model 0.6b); fi
bg_step train_step_flops 300 env CUDA_VISIBLE_DEVICES= $PY benchmarks/bench_train_step.py "${flops[@]}" --out "$RESULTS"
if [ -f benchmarks/bench_compile.py ]; then
  # Compiles real kernels (ptxas): never under the interpreter.
  bg_step compile 300 env TRITON_INTERPRET=0 $PY benchmarks/bench_compile.py --out "$RESULTS/compile"
else
  echo "== compile: skipped, benchmarks/bench_compile.py not in this checkout"
fi
step pooling_check 60 $PY benchmarks/bench_pooling.py --check "${cpu[@]}" --out "$RESULTS"
step pooling_bench 90 $PY benchmarks/bench_pooling.py "${cpu[@]}" "${quick[@]}" --out "$RESULTS"
step contrastive_check 75 $PY benchmarks/bench_contrastive.py --check "${cpu[@]}" --out "$RESULTS"
step contrastive_bench 120 $PY benchmarks/bench_contrastive.py "${cpu[@]}" "${quick[@]}" --out "$RESULTS"
# Matryoshka (F2LLM v2's 8 levels at D=1024): the fused ops vs float64, then their cost vs one level and v2's loop.
step matryoshka_check 45 $PY benchmarks/bench_matryoshka.py --check "${cpu[@]}" --out "$RESULTS"
step matryoshka_bench 90 $PY benchmarks/bench_matryoshka.py "${cpu[@]}" "${quick[@]}" --out "$RESULTS"
# Layer exits (ML-Embed's 7 exits x 8 levels, fp32 embeddings as the Encoder hands them): F2LLMLoss vs ML-Embed's loop
# in float64, then its time and memory vs that loop and vs one exit (the loss part; FLOPs and CPU step: CPU runs).
step layer_exits_check 45 $PY benchmarks/bench_layer_exits.py --check "${cpu[@]}" --out "$RESULTS"
step layer_exits_bench 75 $PY benchmarks/bench_layer_exits.py --loss "${cpu[@]}" "${quick[@]}" --out "$RESULTS"
# The training step gets the rest; its own --budget-s stops starting gradient-cache rows 30 s before the timeout.
train_limit=$(($(remaining) - REPORT_RESERVE_S))
step train_step "$train_limit" $PY benchmarks/bench_train_step.py "${cpu[@]}" "${quick[@]}" \
  --budget-s $((train_limit > 60 ? train_limit - 30 : train_limit / 2)) --out "$RESULTS"

wait_bg
# A background step's failure is in steps.txt only.
[ ! -f "$RESULTS/steps.txt" ] || awk '$2 != "0" { failed = 1 } END { exit failed }' "$RESULTS/steps.txt" || status=1

timeout 45 $PY benchmarks/report.py plots "$RESULTS" || { echo "gpu_suite: report.py plots failed"; status=1; }
timeout 20 $PY benchmarks/report.py summary "$RESULTS" >/dev/null || { echo "gpu_suite: report.py summary failed"; status=1; }
rm -rf "$site"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  tar -czf "$OUT/results.tar.gz" -C "$RESULTS_ROOT" "$run_dir"
  cp "$RESULTS"/summary.md "$OUT"/ 2>/dev/null
  cp "$RESULTS"/*.png "$OUT"/ 2>/dev/null
  echo "gpu_suite: wrote $OUT/results.tar.gz (unpack into benchmarks/results/ to commit $run_dir)"
fi
echo "gpu_suite: results in $RESULTS, $((SECONDS - suite_start)) s in all"
echo
cat "$RESULTS/summary.md" 2>/dev/null || echo "gpu_suite: no summary (report.py summary failed)"
exit $status
