#!/usr/bin/env bash
# Every GPU test and benchmark in one pass, sized for a few minutes on one H200.
#   bash bench/gpu_check.sh            (OUT=dir keeps the logs; default /tmp/gpu-check)
# The device machine has torch, numpy, pytest, pyarrow but no torchscale/faiss: wheels for those
# are carried in .whl/ (see README, "GPU"). lancedb's wheel is too large to carry, so the
# GPU indexing benchmark uses the FAISS store; no beit3 code needs a network.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
START=$(date +%s)
status=()
step() {  # step NAME TIMEOUT_S CMD...: run, keep the log, remember the exit status
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(( $(date +%s) - START )) s into the run)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-14}" "$OUT/$name.log"
  status+=("$name rc=$rc")
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

step tests 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests/beit3/test_gpu.py \
  tests/beit3/pretrain/test_gpu.py tests/training/test_gpu.py
step model_speed_b8 60 $PY bench/model_speed.py --device cuda --batch 8 --repeats 20
step model_speed_b64 60 $PY bench/model_speed.py --device cuda --batch 64 --repeats 10
step train_speed 90 $PY bench/train_speed.py --device cuda --preset beit3-base --json "$OUT/train_speed.json"
step pretrain_speed 100 $PY bench/pretrain_speed.py --device cuda --preset beit3-base --json "$OUT/pretrain_speed.json"
TAIL=40 step pretrain_compiled 150 $PY bench/pretrain_speed.py --device cuda --preset beit3-base \
  --compile --profile 3 --json "$OUT/pretrain_compiled.json"
step index_speed 70 $PY bench/index_speed.py --device cuda --preset beit3-base --backend faiss \
  --workers 12 --batch-size 256 --count 2000
step rerank_speed 60 $PY bench/rerank_speed.py --device cuda --queries 30 --backend faiss
step model_speed_compiled 90 $PY bench/model_speed.py --device cuda --batch 8 --repeats 20 --compile
echo "=== summary ($(( $(date +%s) - START )) s)"
printf '%s\n' "${status[@]}"
