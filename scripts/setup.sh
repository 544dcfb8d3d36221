#!/usr/bin/env bash
# Set up everything scm needs, idempotently, on a machine with only python3:
#   .venv/ (virtual environment in the repository root), torch, triton, the test tools, and scm in
#   editable mode with its C++ extension scm_kernels._C built.
# Re-running is cheap: installed packages are kept and the extension is rebuilt only when
# setup.py, csrc/ or torch changed.
#
# Environment:
#   PYTHON               interpreter that creates the venv            (default: python3)
#   SCM_TORCH_SPEC       pip requirement for torch                     (default: torch==2.13.0, the CPU wheel here)
#   SCM_TORCH_INDEX_URL  extra index for torch, e.g. a CUDA wheel index (default: none)
#   SCM_KERNELS_SKIP_BUILD=1   do not build the extension (reference/triton backends only)
#   TORCH_CUDA_ARCH_LIST GPU architectures of the CUDA kernels         (default: "8.0;9.0")
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${SCM_TORCH_SPEC:-torch==2.13.0}
PY=.venv/bin/python
pipq() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if [ ! -x "$PY" ]; then
  echo "[setup] creating .venv with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv .venv
elif ! "$PY" -m pip --version >/dev/null 2>&1; then
  # a venv whose creation was interrupted (no pip yet): finish it, keeping whatever is installed
  echo "[setup] .venv has no pip (interrupted set-up?): installing pip with ensurepip"
  "$PY" -m ensurepip --upgrade >/dev/null 2>&1 || { echo "[setup] recreating .venv"; "$PYTHON" -m venv --clear .venv; }
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  if [ -n "${SCM_TORCH_INDEX_URL:-}" ]; then
    pipq "$TORCH_SPEC" --extra-index-url "$SCM_TORCH_INDEX_URL"
  else
    pipq "$TORCH_SPEC"
  fi
fi
# triton: CUDA builds of torch bring their own; the CPU wheel does not.
"$PY" -c "import triton" 2>/dev/null || { echo "[setup] installing triton"; pipq triton; }
"$PY" -c "import numpy, ninja, setuptools, wheel, pytest, hypothesis, expecttest" 2>/dev/null || {
  echo "[setup] installing numpy, ninja, build and test tools"
  pipq numpy ninja setuptools wheel pytest hypothesis expecttest
}
# scm's runtime dependencies (pyproject's `dependencies`; the editable install below uses --no-deps).
"$PY" -c "import safetensors, sklearn, PIL, tqdm, matplotlib" 2>/dev/null || {
  echo "[setup] installing safetensors, scikit-learn, Pillow, tqdm, matplotlib"
  pipq safetensors scikit-learn Pillow tqdm matplotlib
}
# diffusers: only the tests of scm_kernels.nn.AttentionProcessor use it (optional for users).
"$PY" -c "import diffusers" 2>/dev/null || { echo "[setup] installing diffusers (for the tests)"; pipq diffusers; }
"$PY" -c "import torch, triton" || { echo "[setup] torch/triton failed to install" >&2; exit 1; }

# Build + editable install, only when the sources or torch changed.
stamp=.venv/.scm-build-stamp
want=$( { cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat; "$PY" -c "import torch; print(torch.__version__)"; echo "${SCM_KERNELS_SKIP_BUILD:-0}"; } | sha256sum | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$want" != "$have" ] || ! "$PY" -c "import scm_kernels" 2>/dev/null; then
  echo "[setup] building scm (editable) with scm_kernels._C"
  "$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "import scm_kernels" || { echo "[setup] scm failed to install" >&2; exit 1; }
  if [ "${SCM_KERNELS_SKIP_BUILD:-0}" != "1" ]; then
    "$PY" -c "import scm_kernels._C" || { echo "[setup] scm_kernels._C failed to build; see the output above" >&2; exit 1; }
  fi
  echo "$want" > "$stamp"
fi
"$PY" - <<'PY'
import torch, triton, scm_kernels
from scm_kernels import backend
print(f"[setup] ready: torch {torch.__version__}, triton {triton.__version__}, scm_kernels {scm_kernels.__version__}, "
      f"backends on cpu: {backend.available_backends('cpu')}"
      + (f", on cuda: {backend.available_backends('cuda')}" if torch.cuda.is_available() else ""))
PY
