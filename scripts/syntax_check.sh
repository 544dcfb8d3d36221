#!/usr/bin/env bash
# Fast syntax/type check of C++ or CUDA sources against torch's headers, without building:
#   scripts/syntax_check.sh csrc/cpu/foo.cpp csrc/cuda/foo.cu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
INC=$("$PY" -c 'import sysconfig; from torch.utils.cpp_extension import include_paths; print(" ".join("-I"+p for p in include_paths() + [sysconfig.get_paths()["include"]]))')
for f in "$@"; do
  case "$f" in
    *.cu) nvcc -std=c++17 -arch=sm_80 -Icsrc/include $INC -c "$f" -o /dev/null ;;
    *) c++ -std=c++17 -fsyntax-only -fopenmp -Icsrc/include $INC "$f" ;;
  esac
  echo "ok: $f"
done
