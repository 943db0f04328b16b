#!/usr/bin/env bash
# Creates .venv with the pinned CPU stack (torch 2.13.0 CPU, fbgemm-gpu-cpu 1.8.0,
# torchrec 1.9.2) and installs this package in editable mode.
#
# torchrec's metadata asks for the CUDA `fbgemm-gpu` (same import name as fbgemm-gpu-cpu,
# several GB, pulls CUDA torch), so torchrec goes in with --no-deps plus its real needs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.stack-installed-v3"
if [ -f "$STAMP" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned exactly: a looser pin downloads a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q "fbgemm-gpu-cpu==1.8.0"
$PIP install -q --no-deps "torchrec==1.9.2"
$PIP install -q -r requirements/cpu.txt
$PIP install -q --no-deps -e .
# Guard against the trap: no CUDA fbgemm-gpu and no nvidia-* wheels may have slipped in.
if $VENV/bin/python -m pip list 2>/dev/null | grep -Ei '^(nvidia-|fbgemm-gpu )'; then
  echo "setup_env: a CUDA package was installed (see above); refusing" >&2
  exit 1
fi
touch "$STAMP"
