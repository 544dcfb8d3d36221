#!/usr/bin/env bash
# Incremental in-place build of scm_kernels._C (ninja, ./build). Serialized with a lock so that
# several builds started at once do not trample each other's build directory.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec flock /tmp/scm_build.lock "$PY" setup.py -q build_ext --inplace "$@"
