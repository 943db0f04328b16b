#!/usr/bin/env bash
# The lead's combined GPU run (one device call): GPU tests of every area, then the FP8 speed
# benchmark, the cached-scoring benchmark, the AOTI load probe (benchmarks/aoti_load_probe.py,
# off by default) and the CUDA predict latency (AOTInductor package vs eager, Triton bf16 and
# FP8 mode 2), each bounded in time and each writing its log under $OUT as it goes. A step
# whose time budget is 0 is skipped. Usage on the device (repo root, .whl carried):
#   [TESTS=...] TEST_S=230 HOSTGPU_S=0 BWD_S=0 FP8FWD_S=0 ATTN_S=0 [ATTN_ARGS=...] FP8_S=130 CACHED_S=45 PROBE_S=0 [PROBE_CASES=... PROBE_PARALLEL=6] PREDICT_S=150 bash benchmarks/run_device_suite.sh
set -u
OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 HYPOTHESIS_PROFILE=ci
# FBGEMM's CUTLASS HSTU kernels, when .cutlass is carried (../shared/device/cutlass_wheel.sh).
# shellcheck disable=SC1091
if [ -f .cutlass/setup.sh ]; then source .cutlass/setup.sh; export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH; fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader;
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
# TESTS narrows the run to some files (or node ids); the default is every file with GPU tests.
TESTS=${TESTS:-"tests/ops/test_cutlass_gpu.py tests/modules/test_no_host_sync_gpu.py tests/ops/test_triton_attention.py tests/ops/test_triton_fp8.py tests/ops/test_triton_fp8_quantize.py
  tests/ops/test_delta_attention.py tests/modules/test_kv_cache.py tests/export/test_export_gpu.py
  tests/ops/test_fp8_emulation.py tests/ops/test_fp8_quantize.py tests/ops/test_hstu_attention.py
  tests/ops/test_jagged.py tests/ops/test_fp8_export.py"}
if [ "${TEST_S:-230}" -gt 0 ]; then
# shellcheck disable=SC2086 # TESTS is a list of paths
timeout "${TEST_S:-230}" python3 -m pytest -m gpu -n "${WORKERS:-12}" -v -p no:cacheprovider -p no:benchmark \
  $TESTS > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -n 25 "$OUT/gpu_tests.log"
fi
if [ "${HOSTGPU_S:-0}" -gt 0 ]; then
mkdir -p "$OUT/results"
# shellcheck disable=SC2086 # HOSTGPU_ARGS is a list of flags
timeout "${HOSTGPU_S}" python3 benchmarks/host_vs_gpu_step.py --out "$OUT/results/host-vs-gpu-step.json" ${HOSTGPU_ARGS:-} \
  > "$OUT/host_vs_gpu.log" 2>&1
echo "host vs gpu rc=$?"; tail -n 15 "$OUT/host_vs_gpu.log"
fi
if [ "${BWD_S:-0}" -gt 0 ]; then
mkdir -p "$OUT/results"
# shellcheck disable=SC2086 # BWD_ARGS is a list of flags
timeout "${BWD_S}" python3 benchmarks/bwd_layouts.py --out "$OUT/results/bwd-layouts.json" ${BWD_ARGS:-} \
  > "$OUT/bwd_layouts.log" 2>&1
echo "bwd layouts rc=$?"; tail -n 60 "$OUT/bwd_layouts.log"
fi
if [ "${FP8FWD_S:-0}" -gt 0 ]; then
mkdir -p "$OUT/results"
# shellcheck disable=SC2086 # FP8FWD_ARGS is a list of flags
timeout "${FP8FWD_S}" python3 benchmarks/fp8_fwd_speed.py --out "$OUT/results" --budget "$(( FP8FWD_S - 20 ))" ${FP8FWD_ARGS:-} \
  > "$OUT/fp8_fwd_speed.log" 2>&1
echo "fp8 fwd speed rc=$?"; tail -n 40 "$OUT/fp8_fwd_speed.log"
fi
if [ "${ATTN_S:-0}" -gt 0 ]; then
mkdir -p "$OUT/results"
# shellcheck disable=SC2086 # ATTN_ARGS is a list of flags
timeout "${ATTN_S}" python3 benchmarks/attention.py --out-dir "$OUT/results" ${ATTN_ARGS:-} \
  > "$OUT/attention.log" 2>&1
echo "attention rc=$?"; tail -n 30 "$OUT/attention.log"
fi
if [ "${ATTN2_S:-0}" -gt 0 ]; then
# shellcheck disable=SC2086 # ATTN2_ARGS is a list of flags
timeout "${ATTN2_S}" python3 benchmarks/attention.py --out-dir "$OUT/results" ${ATTN2_ARGS:-} \
  > "$OUT/attention2.log" 2>&1
echo "attention (2) rc=$?"; tail -n 12 "$OUT/attention2.log"
fi
if [ "${FP8_S:-130}" -gt 0 ]; then
timeout "${FP8_S:-130}" python3 benchmarks/fp8_speed.py --out "$OUT" --budget-s "$(( ${FP8_S:-130} - 25 ))" \
  > "$OUT/fp8_speed.log" 2>&1
echo "fp8 speed rc=$?"; tail -n 30 "$OUT/fp8_speed.log"
fi
if [ "${CACHED_S:-45}" -gt 0 ]; then
timeout "${CACHED_S:-45}" python3 benchmarks/cached_scoring.py --device cuda --histories 1024 4096 8192 --candidates 16 256 \
  --repeats 5 --no-write > "$OUT/cached_scoring.log" 2>&1
echo "cached scoring rc=$?"; tail -n 12 "$OUT/cached_scoring.log"
fi
if [ "${PROBE_S:-0}" -gt 0 ]; then
timeout "${PROBE_S}" python3 benchmarks/aoti_load_probe.py --device cuda --out-dir "$OUT/aoti_probe" \
  --budget-s "$(( PROBE_S - 15 ))" --parallel "${PROBE_PARALLEL:-6}" ${PROBE_CASES:+--cases $PROBE_CASES} \
  > "$OUT/aoti_probe.log" 2>&1
echo "aoti load probe rc=$?"; tail -n 40 "$OUT/aoti_probe.log"
fi
if [ "${PREDICT_S:-150}" -gt 0 ]; then
mkdir -p "$OUT/results"
for mode in -1 2; do
  timeout "${PREDICT_S:-150}" python3 benchmarks/predict_latency.py --device cuda --kernel TRITON \
    --mixed-precision bf16 --fp8-quant-mode "$mode" --out-dir "$OUT/results" > "$OUT/predict_latency_m$mode.log" 2>&1
  echo "predict latency (fp8_quant_mode=$mode) rc=$?"; tail -n 8 "$OUT/predict_latency_m$mode.log"
done
fi
