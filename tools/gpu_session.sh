#!/usr/bin/env bash
# One GPU run, in the order that gains the most:
#   1. train the embedded model: resume the mainline (assets/tiny.safetensors with its
#      .state.pt) for TRAIN_MIN minutes,
#   2. the Triton kernels compiled (tests, then `bench --kernels`),
#   3. the full-size Wan2.1-1.3B architecture with random weights: frames/s and each
#      policy's cost as a share of a step.
# Results go to $OUT (or ./gpu_out): bring back tiny.safetensors, tiny.json and
# tiny.state.pt to continue the mainline here. Each part has its own time limit, so
# one that hangs or fails leaves the others their time.
# Usage: TRAIN_MIN=4.5 bash tools/gpu_session.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
TRAIN_MIN=${TRAIN_MIN:-4.5}
BATCH=${BATCH:-64}
WORKERS=${WORKERS:-14}
TRAIN_ARGS=${TRAIN_ARGS:-}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }

log "device"
nvidia-smi -L 2>&1 | tee -a "$OUT/log.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" 2>&1 | tee -a "$OUT/log.txt"
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the device image lacks (diffusers)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi

log "train ${TRAIN_MIN} min, batch $BATCH, $WORKERS workers"
cp assets/tiny.safetensors assets/tiny.json "$OUT/"
[ -f assets/tiny.state.pt ] && cp assets/tiny.state.pt "$OUT/"
# the reference attention in the rollouts: training must not depend on the kernels' first run
FFVIZ_KERNELS=reference timeout "$(awk "BEGIN{print int($TRAIN_MIN*60+120)}")" \
    $PY -m ffviz train --minutes "$TRAIN_MIN" --batch "$BATCH" --workers "$WORKERS" --save-every 60 \
    --out "$OUT/tiny.safetensors" $TRAIN_ARGS > "$OUT/train.log" 2>&1
log "train exit $?"
grep -E "^step [0-9]*(000|500) |resumed|starting|saved|Error|error" "$OUT/train.log" | tail -25

log "kernel tests (compiled Triton)"
TRITON_INTERPRET=0 timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    > "$OUT/kernels.log" 2>&1
log "kernel tests exit $?"
tail -15 "$OUT/kernels.log"

log "bench --kernels"
timeout 75 $PY -m ffviz bench --kernels --repeats 3 --out "$OUT/bench_kernels.json" 2>&1 | tail -40
log "bench kernels exit ${PIPESTATUS[0]}"

log "wan:full-random"
wan_bench() {
    timeout "${WAN_TIMEOUT:-150}" $PY -m ffviz bench --model wan:full-random \
        --policies full,window,future_forcing --budget 6 --frames 21 --repeats 1 --out "$1" 2>&1 | tail -30
    return "${PIPESTATUS[0]}"
}
if ! wan_bench "$OUT/bench_wan.json"; then  # kernels failing must not hide the model's speed
    log "wan with the Triton kernels failed; again with the PyTorch references"
    FFVIZ_KERNELS=reference wan_bench "$OUT/bench_wan_reference.json"
fi
log "wan done"
