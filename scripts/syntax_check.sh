#!/usr/bin/env bash
# Fast syntax/type check of C++ or CUDA sources against torch's headers, without building:
#   scripts/syntax_check.sh csrc/cpu/foo.cpp csrc/cuda/foo.cu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
INC=$("$PY" -c 'import sysconfig; from torch.utils.cpp_extension import include_paths; print(" ".join("-I"+p for p in include_paths() + [sysconfig.get_paths()["include"]]))')
# The CPU wheel of torch ships c10/cuda headers but not the generated cuda_cmake_macros.h:
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE tells c10 not to include it.
for f in "$@"; do
  case "$f" in
    *.cu) nvcc -std=c++17 -arch=sm_80 -DSCM_WITH_CUDA=1 -Icsrc/include $INC -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -c "$f" -o /dev/null ;;
    *) c++ -std=c++17 -fsyntax-only -fopenmp -fno-trapping-math -Icsrc/include $INC "$f" ;;
  esac
  echo "ok: $f"
done
