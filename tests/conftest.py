import pytest
import torch

import mutex_attn as ma

CPU_BACKENDS = ma.available_backends("cpu")

# Tolerances by dtype for results compared with the float64 SPEC oracle. Gradients and other
# reductions cancel terms of the size of the largest element, so their absolute tolerance
# scales with the largest expected magnitude (GRAD_TOL, "reductions 1e-4").
GRAD_TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=3e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=3e-2, atol=2e-2),
}
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_pair(shape, dtype=torch.float32, layout="contiguous", scale=1.0):
    """x, y of `shape` in a layout: contiguous, channels_last, or non-contiguous (a strided view)."""
    def one():
        if layout == "noncontiguous":
            n, c, h, w = shape
            t = (torch.randn(n, c, h, 2 * w + 1, dtype=torch.float64) * scale).to(dtype)
            return t[..., 1::2]
        t = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        return t
    x, y = one(), one()
    if layout == "noncontiguous":
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    return x, y


def assert_close(actual, expected, dtype, grad=False):
    if not grad:
        torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])
        return
    tol = GRAD_TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * scale
    )
