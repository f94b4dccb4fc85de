#!/usr/bin/env bash
# The prepared GPU check: one script, every step under its own timeout, results in $OUT (default
# runs/gpu_check) as they come. The timeouts sum to 420 s (`TIMEOUTS` below; tests/test_bench.py
# checks it), so a failed step can be rerun inside a 15-minute device budget.
#
#   bash bench/gpu_check.sh                      # on a GPU machine, from the repository root
#   CDCD_GPU_CHECK_REHEARSE=1 bash bench/gpu_check.sh   # the same steps on CPU with cdcd-tiny
#
# Steps, in order:
#   smoke               one Composer batch of cdcd-140m (`composer train.py`, eval, export): does it start?
#   data                16,384 random-token stories: no Composer row below finishes an epoch
#   bare_microbatch     bench/train.py's bare step at the YAML's microbatch, eager and compiled, MFU
#   bare_largest        the bare step at the largest microbatch the device's memory fits
#                       (bench/roofline.py --fit_gib: the traced peak, linear in the microbatch)
#   composer_path       the real Composer path (train.py's Trainer from the YAML) for 24 batches
#   composer_compiled   the same with compile_config={} for 16 batches
#   sampling            generate's throughput on the smoke step's export (sequences/s, 25 evaluations)
# Each step prints one line: `ok NAME (N s)`, or `FAILED NAME: exit RC | TIMEOUT after N s: <last error line>`.
#
# Air-gapped machines: put the wheels of the GPU README's fetch_wheels.sh in .whl/ (git-ignored);
# they are installed into /tmp/site and put on PYTHONPATH (docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}

# name:seconds of every step; the sum is the script's longest run (at SLOWER=1).
TIMEOUTS="smoke:60 data:30 bare_microbatch:100 bare_largest:40 composer_path:60 composer_compiled:95 sampling:35"
if [ -n "${CDCD_GPU_CHECK_REHEARSE:-}" ]; then
  CONFIG=cdcd-tiny; DEVICE=cpu; STORIES=2048; BATCHES=9; STEPS=24; SAMPLES=4; SMALL=32; BIG=64
  SLOWER=${SLOWER:-4}  # the CPU is slower: the timeouts stretch
else
  if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu_check.sh needs a CUDA GPU and torch.cuda.is_available() is False here;" \
         "run it on a GPU machine (or rehearse with CDCD_GPU_CHECK_REHEARSE=1)" >&2
    exit 2
  fi
  CONFIG=cdcd-140m; DEVICE=cuda; STORIES=16384; BATCHES=24; STEPS=24; SAMPLES=64
  SMALL=$($PY -c "import yaml; print(yaml.safe_load(open('yamls/$CONFIG.yaml'))['device_train_microbatch_size'])")
  GIB=$($PY -c 'import torch; print(torch.cuda.mem_get_info()[1] / 2**30)')
  BIG=$($PY bench/roofline.py --config yamls/$CONFIG.yaml --fit_gib "$GIB" | sed -n 's/^microbatch_that_fits=//p')
  BIG=${BIG:-256}
  SLOWER=1
fi

seconds_of() { echo "$TIMEOUTS" | tr ' ' '\n' | sed -n "s/^$1://p"; }
step() {  # step NAME COMMAND...: runs it under its timeout, tees its output into $OUT/NAME.txt
  local name=$1; shift
  local limit=$(( $(seconds_of "$name") * SLOWER )) start=$SECONDS
  echo "== $name (up to $limit s)"
  timeout "$limit" "$@" 2>"$OUT/$name.err" | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]} took=$((SECONDS - start))
  if [ "$rc" = 0 ]; then
    echo "ok $name ($took s)"
  elif [ "$rc" = 124 ]; then
    echo "FAILED $name: TIMEOUT after $took s: $(grep -v '^\s*$' "$OUT/$name.err" | tail -1)"
  else
    echo "FAILED $name: exit $rc: $(grep -v '^\s*$' "$OUT/$name.err" | tail -1)"
  fi
}

WORK=/tmp/cdcd-gpu-check
RUN=$WORK/run
make_data() {  # make_data DIR STORIES: a converted random-token dataset over BERT's vocabulary size
  $PY -c "import sys; sys.path.insert(0, '.'); from bench.train import random_token_dataset as r; print(r('$1', 30522, 128, stories=$2))"
}
smoke() {  # one batch through `composer train.py` on a small dataset of its own: eval and export included
  [ -f "$WORK/smoke/data/cdcd_dataset.json" ] || make_data "$WORK/smoke" 1024 >/dev/null || return 1
  $PY -m composer.cli.launcher -n 1 train.py yamls/$CONFIG.yaml variables.data_root=$WORK/smoke/data \
    run_name=gpu-smoke max_duration=1ba eval_interval=1ba eval_subset_num_batches=1 save_folder=null \
    progress_bar=false callbacks.training_samples=false callbacks.export_weights.folder=$RUN/export \
    callbacks.time_warp_refit.plot_folder=$RUN loggers={} data.num_workers=0 ${CDCD_GPU_CHECK_REHEARSE:+device=cpu}
}
export -f make_data smoke  # `timeout` runs programs: the functions run in `bash -c`
export PY WORK RUN CONFIG
step smoke bash -c smoke
DATA=$WORK/data/data
[ -f "$DATA/cdcd_dataset.json" ] || step data bash -c 'make_data "$0" "$1"' "$WORK/data" $STORIES
step bare_microbatch $PY bench/train.py --configs $CONFIG --compile --batch_size $SMALL --device $DEVICE
step bare_largest $PY bench/train.py --configs $CONFIG --batch_size $BIG --device $DEVICE
step composer_path $PY bench/train.py --configs $CONFIG --trainer --batches $BATCHES --data_root $DATA --device $DEVICE
step composer_compiled $PY bench/train.py --configs $CONFIG --trainer --batches $((BATCHES * 2 / 3)) \
  --data_root $DATA --device $DEVICE --set 'compile_config={}'
step sampling $PY - <<EOF
import time, torch
from cdcd_composer.checkpoints.loading import load_trained_model
model = load_trained_model('$RUN/export', '$DEVICE')
model.generate(2, 2)  # warm-up
start = time.perf_counter()
model.generate($SAMPLES, $STEPS)
if '$DEVICE' == 'cuda':
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
print(f'sampling: {$SAMPLES} sequences x {$STEPS} steps of the default sampler in {seconds:.1f} s = {$SAMPLES / seconds:.2f} sequences/s')
EOF
echo "results in $OUT"
