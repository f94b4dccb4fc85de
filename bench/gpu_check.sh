#!/usr/bin/env bash
# The prepared GPU check of issue 16: one script, every step under its own timeout, results in
# $OUT (default runs/gpu_check) as they come. At most 9.5 minutes (the sum of the timeouts).
#
#   bash bench/gpu_check.sh                      # on a GPU machine, from the repository root
#   CDCD_GPU_CHECK_REHEARSE=1 bash bench/gpu_check.sh   # the same steps on CPU with cdcd-tiny
#
# It prints: the bare training step of cdcd-140m eager and compiled at the YAML's microbatch (64)
# and at 512 (the largest that fits an H200: 64 GiB; an 80 GB H100 holds 256), each with its
# peak memory; the real Composer path (`train.py`'s Trainer from yamls/cdcd-140m.yaml) for 100
# batches, then compiled (`compile_config={}`) for 50; the launch-bound overhead rows of cdcd-5m and
# cdcd-140m (`bench/train.py --overhead`: tiny width, Composer path vs bare step, on the GPU);
# `composer train.py` writing an export; and generate.py's sampling throughput (sequences/s at
# 200 steps of the default sampler, dpmpp_2m).
#
# Air-gapped machines: put the wheels of ../shared/gpu/fetch_wheels.sh in .whl/ (git-ignored);
# they are installed into /tmp/site and put on PYTHONPATH (see ../shared/gpu/README.md).
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

if [ -n "${CDCD_GPU_CHECK_REHEARSE:-}" ]; then
  CONFIG=cdcd-tiny; BATCHES=8; BIG=64; SMALL=32; DEVICE=cpu; STEPS=5; SAMPLES=4
  OVERHEAD="--configs cdcd-tiny --batches 8"
  SLOWER=4  # the CPU is slower: the timeouts stretch
else
  if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu_check.sh needs a CUDA GPU and torch.cuda.is_available() is False here;" \
         "run it on a GPU machine (or rehearse with CDCD_GPU_CHECK_REHEARSE=1)" >&2
    exit 2
  fi
  CONFIG=cdcd-140m; BATCHES=100; BIG=512; SMALL=64; DEVICE=cuda; STEPS=200; SAMPLES=64
  OVERHEAD="--configs cdcd-5m cdcd-140m --batches 16"
  SLOWER=1
fi

step() {  # step NAME SECONDS COMMAND...: runs it under a timeout, tees its output into $OUT/NAME.txt
  local name=$1 seconds=$2; shift 2
  echo "== $name"
  local start=$SECONDS
  timeout $((seconds * SLOWER)) "$@" 2>"$OUT/$name.err" | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "   ($name: exit $rc, $((SECONDS - start)) s)"
  [ "$rc" = 0 ] || tail -5 "$OUT/$name.err"
}

DATA=/tmp/cdcd-gpu-check/data
if [ ! -f "$DATA/cdcd_dataset.json" ]; then
  step data 15 $PY -c "from bench.train import random_token_dataset as r; print(r('/tmp/cdcd-gpu-check', 30522, 128))"
fi
step bare_microbatch 90 $PY bench/train.py --configs $CONFIG --compile --batch_size $SMALL --device $DEVICE
step bare_largest 90 $PY bench/train.py --configs $CONFIG --compile --batch_size $BIG --device $DEVICE
step composer_path 90 $PY bench/train.py --configs $CONFIG --trainer --batches $BATCHES --data_root $DATA --device $DEVICE
step composer_compiled 100 $PY bench/train.py --configs $CONFIG --trainer --batches $((BATCHES / 2)) --data_root $DATA \
  --device $DEVICE --set 'compile_config={}'
step overhead 90 $PY bench/train.py --overhead $OVERHEAD --repeats 1 --device $DEVICE
RUN=/tmp/cdcd-gpu-check/run
step composer_cli 60 $PY -m composer.cli.launcher -n 1 train.py yamls/$CONFIG.yaml variables.data_root=$DATA \
  run_name=gpu-check max_duration=20ba eval_interval=20ba eval_subset_num_batches=2 save_folder=null \
  progress_bar=false callbacks.training_samples=false callbacks.export_weights.folder=$RUN/export \
  callbacks.time_warp_refit.plot_folder=$RUN loggers={}
step sampling 35 $PY - <<EOF
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
