"""Every Triton kernel compiles for a Hopper GPU (sm_90) on this GPU-less machine.

The interpreter that runs the Triton tests in CI executes the kernels as numpy; it never lowers
them through Triton's compiler, so a kernel that only fails at compile time (a type mismatch
between loop iterations, an op with no GPU lowering) would first show up on a GPU. Triton can
compile ahead of time for a named target with the ptxas it ships, no GPU needed: this does
that for each kernel, in the dtypes and launch tiles the backend uses (`_launch`).
"""
import os

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("under the interpreter @triton.jit gives no compilable function", allow_module_level=True)
try:
    from triton.backends.compiler import GPUTarget
except ImportError:  # older Triton
    pytest.skip("this Triton has no GPUTarget", allow_module_level=True)

from mutex_attn.backends.triton import _launch  # noqa: E402
from mutex_attn.backends.triton import kernels as K  # noqa: E402

KERNELS = [K.mab_forward_kernel, K.mab_backward_kernel, K.fab_pool_kernel, K.fab_pool_backward_kernel,
           K.fab_blend_kernel, K.fab_blend_backward_kernel, K.stats_kernel, K.apply_kernel,
           K.backward_stats_kernel, K.backward_apply_kernel]
# Row statistics and gates are float32 whatever the data dtype; argmax indices are int64.
FLOAT32_ARGS = {"mu_ptr", "z_ptr", "v_ptr", "gate_ptr", "dv_ptr", "stats_ptr", "dgate_ptr"}
INT64_ARGS = {"k_ptr"}
# (rows, L, channels_last): ResNet-50 layer1 NCHW (one long row a program), layer4 NCHW
# (L = 49: many rows a program), channels_last.
LAUNCHES = [(4 * 256, 3136, False), (4 * 2048, 49, False), (4 * 256, 3136, True)]


def _signature(kernel, dtype):
    sig = {}
    for name in kernel.arg_names:
        if name in ("BLOCK_R", "BLOCK_L"):
            sig[name] = "constexpr"
        elif name in INT64_ARGS:
            sig[name] = "*i64"
        elif name in FLOAT32_ARGS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        else:
            sig[name] = "i32"
    return sig


def test_signature_rules_cover_every_argument():
    """A new argument must be an obvious pointer (`*_ptr`), a size/stride or a block constant."""
    for kernel in KERNELS:
        for name in kernel.arg_names:
            assert name.endswith("_ptr") or name in ("BLOCK_R", "BLOCK_L", "R", "C", "L", "sN", "sC", "sL"), name


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("launch", LAUNCHES, ids=["nchw-long", "nchw-short", "nhwc"])
def test_kernels_compile_for_sm90(dtype, launch):
    block_r, block_l, warps, _ = _launch(*launch)
    target = GPUTarget("cuda", 90, 32)
    for kernel in KERNELS:
        src = triton.compiler.ASTSource(fn=kernel, signature=_signature(kernel, dtype),
                                        constexprs={"BLOCK_R": block_r, "BLOCK_L": block_l})
        try:
            compiled = triton.compile(src, target=target, options={"num_warps": warps})
        except RuntimeError as err:
            if "ptxas" in str(err) and "not found" in str(err).lower():
                pytest.skip(f"Triton's ptxas is missing here: {err}")
            raise
        assert compiled.asm.get("cubin"), f"{kernel.fn.__name__}: no cubin"
