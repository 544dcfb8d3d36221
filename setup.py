"""Build of scm_kernels._C: the C++/OpenMP CPU kernels always, the CUDA kernels when torch has
CUDA and nvcc is found. SCM_KERNELS_SKIP_BUILD=1 skips the extension (reference/triton backends
only). Install with `pip install --no-build-isolation -e .` so that the build uses your torch."""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    if os.environ.get("SCM_KERNELS_SKIP_BUILD", "0") == "1":
        print("scm_kernels: SCM_KERNELS_SKIP_BUILD=1, not building scm_kernels._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        sys.exit(
            "scm_kernels: torch must be installed before building the extension; install torch, then "
            "`pip install --no-build-isolation -e .` (or set SCM_KERNELS_SKIP_BUILD=1)."
        )

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = ["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    openmp = ["-fopenmp"] if sys.platform != "darwin" else ["-Xpreprocessor", "-fopenmp"]
    # -fno-math-errno, -fno-trapping-math: no errno writes or FP traps to preserve, so the compiler may
    # vectorize loops over sqrt and if-convert selects; results stay IEEE (unlike -ffast-math).
    cxx_flags = ["-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math", *openmp]
    if os.environ.get("SCM_AVX512_EMULATE", "0") == "1":
        # Test builds: the CPU GroupNorm's explicit AVX-512 kernels on any x86-64 CPU, each intrinsic
        # modelled in software (csrc/cpu/avx512_emulated.h; needs SIMDe's headers, Debian libsimde-dev).
        # -mfma: the portable loops then contract a * b + c into FMA in every clone, as the AVX-512
        # clone does on an AVX-512 CPU, so that the build computes what such a CPU computes.
        cxx_flags += ["-DSCM_AVX512_EMULATE", "-mfma"]
    extra = {"cxx": cxx_flags}
    link = ["-fopenmp"] if sys.platform != "darwin" else ["-lomp"]

    with_cuda = (
        torch.version.cuda is not None
        and (ce.CUDA_HOME is not None or shutil.which("nvcc") is not None)
        and os.environ.get("SCM_KERNELS_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += rel("csrc/cuda/*.cu")
        # No --use_fast_math: it would turn sinf/expf/division into approximations in every kernel.
        extra["nvcc"] = ["-O3", "-std=c++17", "-lineinfo"]
        ext = ce.CUDAExtension("scm_kernels._C", sources, include_dirs=include_dirs,
                               extra_compile_args=extra, extra_link_args=link,
                               define_macros=[("SCM_WITH_CUDA", "1")])
    else:
        ext = ce.CppExtension("scm_kernels._C", sources, include_dirs=include_dirs,
                              extra_compile_args=extra, extra_link_args=link)
    print(f"scm_kernels: building scm_kernels._C ({'CPU + CUDA' if with_cuda else 'CPU'})", file=sys.stderr)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

setup(
    packages=find_packages(include=["scm_kernels", "scm_kernels.*", "scm", "scm.*", "benchmarks"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
