"""The "triton" backend: the ten mutex_attn ops as Triton kernels (kernels.py), registered as
torch.library triton_ops under `torch.ops.mutex_attn_triton` so torch.compile can trace them.

Runs on CUDA GPUs; on CPU only under Triton's interpreter (TRITON_INTERPRET=1 set before
triton is imported), which is how CI tests it. Computes in float32 (float16/bfloat16/float32
inputs); float64 needs the native or reference backend.
"""
from __future__ import annotations

import os

import torch
from torch.library import triton_op, wrap_triton

try:
    import triton
except ImportError as err:
    raise ImportError("triton is not installed (`pip install triton`)") from err

from mutex_attn.backends import kernel_backend
from mutex_attn.backends.triton import kernels as K
from mutex_attn.modules import GateNetwork

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton at import, as here
Tensor = torch.Tensor


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA GPU is visible"
    if device.type == "cpu":
        return None if _INTERPRET else (
            "Triton kernels run on CUDA GPUs; on CPU only under Triton's interpreter "
            "(TRITON_INTERPRET=1 set before importing, slow: for tests)")
    return f"Triton has no target for device type {device.type!r}"


# ------------------------------------------------------------------ layout and launch shape
def _geometry(t: Tensor):
    """(tensor to use, channels_last?) — NCHW or channels_last in place, anything else copied."""
    nhwc = kernel_backend.is_channels_last(t)
    return (t if nhwc else t.contiguous()), nhwc


def _same_layout(t: Tensor, nhwc: bool) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


def _strides(shape, nhwc: bool):
    """(sN, sC, sL) of element (n, c, l) for the two layouts."""
    n, c, h, w = shape
    return (h * w * c, 1, c) if nhwc else (c * h * w, h * w, 1)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _launch(rows: int, length: int, nhwc: bool):
    """BLOCK_R rows a program, BLOCK_L positions a chunk, warps. A handful of variants in all:
    channels_last takes 32 channels (coalesced) × up to 64 positions; NCHW takes up to 2048
    positions a chunk and several short rows a program (L = 49: 32 rows of 64)."""
    if nhwc:
        block_r, block_l = 32, min(64, _next_pow2(length))
    else:
        block_l = min(2048, max(16, _next_pow2(length)))
        block_r = max(1, min(32, 2048 // block_l))
    warps = 8 if block_r * block_l >= 2048 else 4
    return block_r, block_l, warps, (triton.cdiv(rows, block_r),)


def _check_dtype(t: Tensor) -> None:
    if t.dtype == torch.float64:
        raise TypeError("the triton backend computes in float32; for float64 use "
                        "backend='native' or backend='reference'")


def _rows(x: Tensor, *last, dtype=torch.float32) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1], *last), dtype=dtype)


def _common(x: Tensor, *others: Tensor):
    """x in a kernel layout, the other full tensors in the same layout, and launch numbers."""
    x, nhwc = _geometry(x)
    n, c, h, w = x.shape
    rows, length = n * c, h * w
    block_r, block_l, warps, grid = _launch(rows, length, nhwc)
    geom = (rows, c, length, *_strides(x.shape, nhwc))
    meta = dict(BLOCK_R=block_r, BLOCK_L=block_l, num_warps=warps)
    return x, [_same_layout(t, nhwc) for t in others], geom, meta, grid


# ------------------------------------------------------------------ the ops
@triton_op("mutex_attn_triton::mab_forward", mutates_args={})
def mab_forward(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x, (y,), geom, meta, grid = _common(x, y)
    am, mu, z = torch.empty_like(x), _rows(x), _rows(x)
    wrap_triton(K.mab_forward_kernel)[grid](x, y, am, mu, z, *geom, **meta)
    return am, mu, z


@triton_op("mutex_attn_triton::mab_backward", mutates_args={})
def mab_backward(dam: Tensor, x: Tensor, y: Tensor, row_max: Tensor, row_sum: Tensor) -> tuple[Tensor, Tensor]:
    x, (y, dam), geom, meta, grid = _common(x, y, dam)
    dx, dy = torch.empty_like(x), torch.empty_like(x)
    wrap_triton(K.mab_backward_kernel)[grid](dam, x, y, row_max.contiguous(), row_sum.contiguous(), dx, dy, *geom, **meta)
    return dx, dy


@triton_op("mutex_attn_triton::fab_pool", mutates_args={})
def fab_pool(am: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    am, (y,), geom, meta, grid = _common(am, y)
    v, k = _rows(am), _rows(am, dtype=torch.long)
    wrap_triton(K.fab_pool_kernel)[grid](am, y, v, k, *geom, **meta)
    return v, k


@triton_op("mutex_attn_triton::fab_pool_backward", mutates_args={})
def fab_pool_backward(dv: Tensor, argmax: Tensor, like: Tensor) -> Tensor:
    n, c, h, w = like.shape
    dmix = like.new_empty(like.shape)  # NCHW-contiguous, as the native op
    block_r, block_l, warps, grid = _launch(n * c, h * w, False)
    wrap_triton(K.fab_pool_backward_kernel)[grid](
        dv.contiguous(), argmax.contiguous(), dmix, n * c, h * w,
        BLOCK_R=block_r, BLOCK_L=block_l, num_warps=warps)
    return dmix


@triton_op("mutex_attn_triton::fab_blend", mutates_args={})
def fab_blend(am: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    am, (y,), geom, meta, grid = _common(am, y)
    out = torch.empty_like(am)
    wrap_triton(K.fab_blend_kernel)[grid](am, y, gate.contiguous(), out, *geom, **meta)
    return out


@triton_op("mutex_attn_triton::fab_blend_backward", mutates_args={})
def fab_blend_backward(dout: Tensor, am: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    am, (y, dout), geom, meta, grid = _common(am, y, dout)
    dam, dy, dgate = torch.empty_like(am), torch.empty_like(am), _rows(am)
    wrap_triton(K.fab_blend_backward_kernel)[grid](dout, am, y, gate.contiguous(), dam, dy, dgate, *geom, **meta)
    return dam, dy, dgate


@triton_op("mutex_attn_triton::mutex_attention_stats", mutates_args={})
def mutex_attention_stats(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, (y,), geom, meta, grid = _common(x, y)
    v, mu, z, k = _rows(x), _rows(x), _rows(x), _rows(x, dtype=torch.long)
    wrap_triton(K.stats_kernel)[grid](x, y, v, mu, z, k, *geom, **meta)
    return v, mu, z, k


@triton_op("mutex_attn_triton::mutex_attention_apply", mutates_args={})
def mutex_attention_apply(x: Tensor, y: Tensor, gate: Tensor, row_max: Tensor, row_sum: Tensor) -> Tensor:
    x, (y,), geom, meta, grid = _common(x, y)
    out = torch.empty_like(x)
    wrap_triton(K.apply_kernel)[grid](x, y, gate.contiguous(), row_max.contiguous(), row_sum.contiguous(), out, *geom, **meta)
    return out


@triton_op("mutex_attn_triton::mutex_attention_backward_stats", mutates_args={})
def mutex_attention_backward_stats(dout: Tensor, x: Tensor, y: Tensor, row_max: Tensor, row_sum: Tensor,
                                   argmax: Tensor) -> Tensor:
    x, (y, dout), geom, meta, grid = _common(x, y, dout)
    stats = _rows(x, 4)
    wrap_triton(K.backward_stats_kernel)[grid](
        dout, x, y, row_max.contiguous(), row_sum.contiguous(), argmax.contiguous(), stats, *geom, **meta)
    return stats


@triton_op("mutex_attn_triton::mutex_attention_backward_apply", mutates_args={})
def mutex_attention_backward_apply(dout: Tensor, x: Tensor, y: Tensor, gate: Tensor, dv: Tensor, row_max: Tensor,
                                   row_sum: Tensor, argmax: Tensor, backward_stats: Tensor) -> tuple[Tensor, Tensor]:
    x, (y, dout), geom, meta, grid = _common(x, y, dout)
    dx, dy = torch.empty_like(x), torch.empty_like(x)
    wrap_triton(K.backward_apply_kernel)[grid](
        dout, x, y, gate.contiguous(), dv.contiguous(), row_max.contiguous(), row_sum.contiguous(),
        argmax.contiguous(), backward_stats.contiguous(), dx, dy, *geom, **meta)
    return dx, dy


# ------------------------------------------------------------------ autograd, interface
ops = torch.ops.mutex_attn_triton
kernel_backend.register_piece_autograd("mutex_attn_triton", ops)
_mab, _fab, _mutex_attention = kernel_backend.make_backend(ops, GateNetwork, reads_channels_last=lambda device: True)


def mab(x: Tensor, y: Tensor) -> Tensor:
    _check_dtype(x)
    return _mab(x, y)


def fab(am: Tensor, y: Tensor, gate_net) -> Tensor:
    _check_dtype(am)
    return _fab(am, y, gate_net)


def mutex_attention(x: Tensor, y: Tensor, gate_net) -> Tensor:
    _check_dtype(x)
    return _mutex_attention(x, y, gate_net)
