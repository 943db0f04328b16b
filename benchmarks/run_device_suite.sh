#!/usr/bin/env bash
# The lead's combined GPU run (one device call): GPU tests of every area, then the FP8 speed
# benchmark, the cached-scoring benchmark and the predict latency, each bounded in time and
# each writing its log under $OUT as it goes. Usage on the device (repo root, .whl carried):
#   bash benchmarks/run_device_suite.sh
set -u
OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader;
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
timeout "${TEST_S:-230}" python3 -m pytest -m gpu -n 12 -v -p no:cacheprovider -p no:benchmark \
  tests/ops/test_triton_attention.py tests/ops/test_triton_fp8.py tests/ops/test_triton_fp8_quantize.py \
  tests/ops/test_delta_attention.py tests/modules/test_kv_cache.py tests/export/test_export_gpu.py \
  tests/ops/test_fp8_emulation.py tests/ops/test_fp8_quantize.py tests/ops/test_hstu_attention.py \
  > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -n 25 "$OUT/gpu_tests.log"
timeout "${FP8_S:-130}" python3 benchmarks/fp8_speed.py --out "$OUT" --budget-s "$(( ${FP8_S:-130} - 25 ))" \
  > "$OUT/fp8_speed.log" 2>&1
echo "fp8 speed rc=$?"; tail -n 30 "$OUT/fp8_speed.log"
timeout 45 python3 benchmarks/cached_scoring.py --device cuda --histories 1024 4096 8192 --candidates 16 256 \
  --repeats 5 --no-write > "$OUT/cached_scoring.log" 2>&1
echo "cached scoring rc=$?"; tail -n 12 "$OUT/cached_scoring.log"
