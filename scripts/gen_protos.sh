#!/usr/bin/env bash
# Regenerate the sidecar's gRPC Python code from its .proto (pass --check to verify only).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" -m atlas_sidecar.serving.proto.generate "$@"
