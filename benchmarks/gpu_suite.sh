#!/usr/bin/env bash
# The one script to run on a GPU machine (see benchmarks/README.md). Checks every kernel against its float64
# reference at real sizes on CUDA (bf16 and fp32), then times each kernel against the PyTorch reference and
# installed peers. Writes JSON + markdown under $OUT (default benchmarks/results/<gpu>/<date>) and prints a
# short summary last. Needs no network: wheels the image lacks are installed from $WHEELS (default .whl/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}

gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null) || {
  echo "gpu_suite: no CUDA device visible to $PY (torch.cuda.get_device_name failed)"; exit 2; }
OUT=${OUT:-benchmarks/results/$gpu/$(date +%F)}
mkdir -p "$OUT"

# Carried wheels (liger-kernel, deepspeed, inf-cl, cut-cross-entropy) go to a private site dir: nothing in the
# image is replaced.
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/f2llm-wheels "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/f2llm-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
# f2llm itself without pip: kernels/ is the package f2llm.kernels.
site=/tmp/f2llm-src
rm -rf "$site" && mkdir -p "$site" && cp -r f2llm "$site/" && cp -r kernels "$site/f2llm/kernels"
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  $PY -m pip list 2>/dev/null | grep -iE '^(transformers|liger|deepspeed|inf.cl|cut.cross|sentence)' || true
} | tee "$OUT/environment.txt"

status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember failures, keep going
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
  echo "$name $rc $((SECONDS - t0))" >> "$OUT/steps.txt"
}

step pooling_check $PY benchmarks/bench_pooling.py --check --out "$OUT"
step pooling_bench $PY benchmarks/bench_pooling.py --out "$OUT"
step contrastive_check $PY benchmarks/bench_contrastive.py --check --out "$OUT"
step contrastive_bench $PY benchmarks/bench_contrastive.py --out "$OUT"

echo
echo "== summary ($OUT)"
column -t "$OUT/steps.txt" 2>/dev/null || cat "$OUT/steps.txt"
for f in "$OUT"/pooling_cuda.md "$OUT"/contrastive_cuda.md; do [ -f "$f" ] && tail -n +5 "$f"; done
exit $status
