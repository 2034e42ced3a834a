"""The "native" backend: the C++ extension mutex_attn._C (ops under torch.ops.mutex_attn).

This module loads the extension and registers, for every op, its fake (meta) kernel and,
for the differentiable ones, its autograd formula. The CPU and CUDA kernels themselves are
registered in C++ (csrc/cpu, csrc/cuda).
"""
from __future__ import annotations

import torch

from mutex_attn.backends import kernel_backend
from mutex_attn.modules import GateNetwork
from mutex_attn.reference import compute_dtype

try:
    from mutex_attn import _C  # noqa: F401  (loading it registers the ops)
except ModuleNotFoundError as err:
    raise ImportError(
        "the C++ extension mutex_attn._C is not built; build it with "
        "`pip install --no-build-isolation -e .`"
    ) from err
except ImportError as err:  # e.g. undefined symbols: built against another torch
    raise ImportError(
        f"the C++ extension mutex_attn._C does not load ({err}); it was probably built "
        "against another torch: rebuild it with `pip install --no-build-isolation -e .`"
    ) from err

_OPS = (
    "mab_forward", "mab_backward", "fab_pool", "fab_pool_backward", "fab_blend",
    "fab_blend_backward", "mutex_attention_stats", "mutex_attention_apply",
    "mutex_attention_backward_stats", "mutex_attention_backward_apply",
)
_missing = [name for name in _OPS if not hasattr(torch.ops.mutex_attn, name)]
if _missing:
    raise ImportError(
        f"the built extension mutex_attn._C is stale: it lacks {_missing}; "
        "rebuild it with `pip install --no-build-isolation -e .`"
    )

ops = torch.ops.mutex_attn


# Which devices the build has kernels for: asked once, not on every call.
_KERNELS = {
    device_type: torch._C._dispatch_has_kernel_for_dispatch_key("mutex_attn::mab_forward", key)
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}


def _has_kernel(device_type: str) -> bool:
    return _KERNELS.get(device_type, False)


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda" and not _has_kernel("cuda"):
        return ("the extension was built without CUDA kernels; rebuild with "
                "`FORCE_CUDA=1 pip install --no-build-isolation -e .`")
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if not _has_kernel(device.type):
        return f"it has no kernels for device type {device.type!r}"
    return None


# ------------------------------------------------------------------ fake (meta) kernels
def _like(x: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """The output layout of a kernel: channels_last stays channels_last where the kernels read
    it in place (every CUDA kernel; on CPU the fused MutexAttention ones); everything else is
    NCHW-contiguous."""
    if kernel_backend.is_channels_last(x) and (fused or x.device.type == "cuda"):
        return torch.empty_like(x, memory_format=torch.channels_last)
    return x.new_empty(x.shape)


def _rows(x: torch.Tensor, *last: int, dtype=None) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1], *last), dtype=dtype or compute_dtype(x.dtype))


@torch.library.register_fake("mutex_attn::mab_forward")
def _(x, y):
    return _like(x), _rows(x), _rows(x)


@torch.library.register_fake("mutex_attn::mab_backward")
def _(dam, x, y, row_max, row_sum):
    return _like(x), _like(x)


@torch.library.register_fake("mutex_attn::fab_pool")
def _(am, y):
    return _rows(am), _rows(am, dtype=torch.long)


@torch.library.register_fake("mutex_attn::fab_pool_backward")
def _(dv, argmax, like):
    return like.new_empty(like.shape)


@torch.library.register_fake("mutex_attn::fab_blend")
def _(am, y, gate):
    return _like(am)


@torch.library.register_fake("mutex_attn::fab_blend_backward")
def _(dout, am, y, gate):
    return _like(am), _like(am), _rows(am)


@torch.library.register_fake("mutex_attn::mutex_attention_stats")
def _(x, y):
    return _rows(x), _rows(x), _rows(x), _rows(x, dtype=torch.long)


@torch.library.register_fake("mutex_attn::mutex_attention_apply")
def _(x, y, gate, row_max, row_sum):
    return _like(x, fused=True)


@torch.library.register_fake("mutex_attn::mutex_attention_backward_stats")
def _(dout, x, y, row_max, row_sum, argmax):
    return _rows(x, 4)


@torch.library.register_fake("mutex_attn::mutex_attention_backward_apply")
def _(dout, x, y, gate, dv, row_max, row_sum, argmax, backward_stats):
    return _like(x, fused=True), _like(x, fused=True)


# ------------------------------------------------------------------ autograd, interface
kernel_backend.register_piece_autograd("mutex_attn", ops)
# The fused kernels read channels_last in place on CPU and CUDA (on CPU the MAB and FAB piece
# ops work on NCHW rows and copy channels_last inputs).
mab, fab, mutex_attention = kernel_backend.make_backend(
    ops, GateNetwork, reads_channels_last=lambda device: True)
