#!/usr/bin/env bash
# Issue 14's GPU checks in one device call (../shared/GPU.md): install what the GPU image
# lacks from the wheels carried in .whl/ (../shared/tools/device-wheels.sh downloads them)
# and slimdiff itself, run tests/gpu, then tools/gpu_latency.py within the seconds left.
# Everything lands under $OUT (the device tool brings it back):
#   gpu.txt            nvidia-smi's view of the card
#   tests_gpu.txt      pytest tests/gpu (aoti, ort-cuda, trt-rtx; skips say why)
#   parts.txt          which big wheels (tools/gpu_parts.sh) were joined and installed
#   latency/results.json and the table it prints (tools/gpu_latency.py)
#
#   device run: bash tools/gpu_check.sh     carry: [".whl"]    timeout_s: 570
#   (after the tools/gpu_parts.sh stash calls, if ort-cuda / trt-rtx are wanted)
#   knobs: TESTS_S (pytest limit, default 150), BUDGET (latency seconds, default 300),
#          LATENCY_ARGS (extra arguments, e.g. "--families sdxl --variants base ssd-1b")
set -uo pipefail
OUT=${OUT:-gpu-out}
TESTS_S=${TESTS_S:-150}
BUDGET=${BUDGET:-300}
mkdir -p "$OUT"
start=$(date +%s)

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "wheel install failed: run device-wheels.sh, carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site
# Wheels stashed by earlier calls in parts (tools/gpu_parts.sh): onnxruntime-gpu for
# ort-cuda, the TensorRT-RTX EP for trt-rtx. Without them those rows are skipped, saying why.
bash tools/gpu_parts.sh install 2>&1 | tee "$OUT/parts.txt"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
  || { echo "slimdiff install failed"; exit 1; }

nvidia-smi --query-gpu=name,compute_cap,memory.total,clocks.sm,clocks.max.sm,power.limit \
  --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
  | tee -a "$OUT/gpu.txt"

timeout "$TESTS_S" python3 -m pytest -q -rs -p no:cacheprovider tests/gpu \
  > "$OUT/tests_gpu.txt" 2>&1
echo "tests/gpu exit $? ($(( $(date +%s) - start )) s so far)"
tail -n 12 "$OUT/tests_gpu.txt"

# shellcheck disable=SC2086  # LATENCY_ARGS is a list of words
python3 tools/gpu_latency.py --out "$OUT/latency" --budget "$BUDGET" ${LATENCY_ARGS:-} \
  > "$OUT/latency.log" 2>&1
echo "gpu_latency exit $? ($(( $(date +%s) - start )) s in all)"
tail -n 30 "$OUT/latency.log"
