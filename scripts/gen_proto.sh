#!/usr/bin/env bash
# Regenerate torchrec_hstu/config/hstu_pb2.py from torchrec_hstu/config/hstu.proto.
#
# Uses the protoc bundled in grpcio-tools 1.62.3 (protobuf 4.25 gencode). That gencode has no
# runtime version check, so the committed file imports under protobuf 5, 6 and 7; gencode from
# a newer protoc refuses runtimes older than itself. The generator goes into a throwaway
# --target directory (never into .venv). The sha256 of the .proto is appended to the generated
# module as PROTO_SHA256; tests/config/test_generated_code.py fails when it no longer matches.
#
# Usage: bash scripts/gen_proto.sh        (GEN_PROTO_TOOLS=DIR to choose the tools directory)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TOOLS=${GEN_PROTO_TOOLS:-/tmp/torchrec_hstu_grpcio_tools_1.62.3}
PROTO=torchrec_hstu/config/hstu.proto
OUT=torchrec_hstu/config/hstu_pb2.py

if ! PYTHONPATH="$TOOLS" "$PY" -c "import grpc_tools.protoc" 2>/dev/null; then
  "$PY" -m pip install -q --target "$TOOLS" "grpcio-tools==1.62.3"
fi
PYTHONPATH="$TOOLS" "$PY" -m grpc_tools.protoc -I . --python_out=. "$PROTO"
sha=$(sha256sum "$PROTO" | cut -d' ' -f1)
{
  echo ""
  echo "# sha256 of ${PROTO} this module was generated from (checked by the tests)."
  echo "PROTO_SHA256 = \"${sha}\""
} >> "$OUT"
echo "wrote $OUT (protoc from grpcio-tools 1.62.3; ${PROTO} sha256 ${sha})"
