"""Builds mutex_attn._C: the CPU kernels always, the CUDA kernels when a GPU is visible or
FORCE_CUDA=1. Build against the installed torch: `pip install --no-build-isolation -e .`

Environment: FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST (default when no GPU is visible: 8.0;9.0),
MAX_JOBS (parallel compile jobs), DEBUG=1 (-O0 -g), MUTEX_ATTN_PORTABLE=1 (no -march=native),
MUTEX_ATTN_NO_EXTENSION=1 (skip the extension: the reference backend still works).
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# torch guesses CUDA_HOME from the `nvcc` on PATH; a shim in /usr/local/bin makes that
# /usr/local, which fails at link time (-lcudart not found). Prefer the real toolkit folder.
if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def get_extensions():
    if _flag("MUTEX_ATTN_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _flag("DEBUG")
    with_cuda = _flag("FORCE_CUDA") or (torch.cuda.is_available() and CUDA_HOME is not None)
    if with_cuda and not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # A100 and H100/H200

    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for is OpenMP in headers. -ffp-contract=off: see sq_dist in
    # csrc/row_math.h (an FMA across d − mu would break the softmax's overflow guard).
    cxx = opt + ["-fopenmp", "-ffp-contract=off"]
    if not _flag("MUTEX_ATTN_PORTABLE") and not debug:
        cxx.append("-march=native")
    args = dict(
        name="mutex_attn._C",
        sources=sources,
        extra_compile_args={"cxx": cxx},
        # The tiny _C module uses only the stable Python ABI: one build serves Python 3.10+.
        py_limited_api=True,
        define_macros=[("Py_LIMITED_API", "0x030A0000")],
    )
    if with_cuda:
        args["sources"] += rel("csrc/cuda/*.cu")
        args["define_macros"].append(("WITH_CUDA", None))
        args["extra_compile_args"]["nvcc"] = opt + ["--use_fast_math", "-lineinfo"]
        ext = CUDAExtension(**args)
    else:
        ext = CppExtension(**args)
    cmdclass = {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}
    return [ext], cmdclass


ext_modules, cmdclass = get_extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
