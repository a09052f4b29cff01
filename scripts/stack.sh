#!/usr/bin/env bash
# The local service stack on 127.0.0.1 (S3 endpoint, MLflow server, Ray head):
#   scripts/stack.sh up|down|status|env [--help for the options]
# Runs scripts/stack.py with the project's virtual environment (make install), else python3.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
exec "$py" "$here/stack.py" "$@"
