#!/usr/bin/env bash
# One device call: fwd / fwd+bwd timings of our Triton bf16 and FP8 attention beside FBGEMM's
# CUTLASS bf16 and FP8 (public entries, N=8192 D=128 B=16 H=4, mode 2), then ncu (full set,
# SASS with stall samples) of each backward, packed in $OUT/profile.tgz (the device returns 8 files). Repo root; .whl and .cutlass carried. Writes $OUT.
set -u
OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
# shellcheck disable=SC1091
if [ -f .cutlass/setup.sh ]; then source .cutlass/setup.sh; export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH; fi
TOOL=benchmarks/tools/bwd_profile_once.py
SHAPE=${SHAPE:-"--n 8192 --dim 128"}
for kind in ${TIME_KINDS-triton_bf16 triton_fp8 cutlass_bf16 cutlass_fp8}; do
  # shellcheck disable=SC2086
  timeout 120 python3 $TOOL --kind "$kind" --mode "${MODE:-2}" $SHAPE >> "$OUT/timings.jsonl" 2> "/tmp/time_$kind.err"
  tail -n 1 "$OUT/timings.jsonl"
done
mkdir -p /tmp/prof
for kind in ${PROFILE_KINDS-triton_fp8 triton_bf16 cutlass_fp8}; do
  # shellcheck disable=SC2086
  timeout "${NCU_S:-150}" ncu --profile-from-start off --clock-control none --set full --import-source yes \
    ${NCU_FILTER:+-k "regex:$NCU_FILTER"} -f -o "/tmp/$kind" python3 $TOOL --kind "$kind" --mode "${MODE:-2}" $SHAPE --profile > "/tmp/prof/ncu_$kind.log" 2>&1
  echo "ncu $kind rc=$?"; tail -n 3 "/tmp/prof/ncu_$kind.log"
  mkdir -p /tmp/prof
  ncu -i "/tmp/$kind.ncu-rep" --page details > "/tmp/prof/${kind}_details.txt" 2>&1
  ncu -i "/tmp/$kind.ncu-rep" --page source --csv --print-source sass > "/tmp/prof/${kind}_sass.csv" 2>&1
  ls -la /tmp/prof
done
mkdir -p /tmp/prof; cp "$OUT"/*.jsonl "$OUT"/*.log /tmp/prof/ 2>/dev/null
tar czf "$OUT/profile.tgz" -C /tmp prof
