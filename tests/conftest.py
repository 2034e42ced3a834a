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


def float_dtype(backend):
    """The most precise dtype a backend computes in: float64, except Triton's float32."""
    return torch.float32 if backend == "triton" else torch.float64


def skip_float64(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend computes in float32")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_pair(shape, dtype=torch.float32, layout="contiguous", scale=1.0, device="cpu"):
    """x, y of `shape` in a layout: contiguous, channels_last, or non-contiguous (a strided view).
    Values are drawn on the CPU (the same numbers on every device)."""
    def one():
        if layout == "noncontiguous":
            n, c, h, w = shape
            t = (torch.randn(n, c, h, 2 * w + 1, dtype=torch.float64) * scale).to(dtype)
            return t.to(device)[..., 1::2]
        t = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        return t
    x, y = one(), one()
    if layout == "noncontiguous":
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    return x, y


def max_error(got, want):
    """Largest error relative to the largest expected magnitude (at least 1)."""
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    return (got.double().cpu() - want.double().cpu()).abs().max().item() / scale if want.numel() else 0.0


def assert_as_accurate(got, baseline, truth, floor):
    """Each tensor of `got` is within `floor` of the truth, or at worst twice as far from it
    as the baseline implementation (e.g. the reference in the same dtype) is."""
    for i, (g, b, t) in enumerate(zip(got, baseline, truth)):
        err, base = max_error(g, t), max_error(b, t)
        assert err <= max(2 * base, floor), f"tensor {i}: error {err:.3g}, baseline {base:.3g}"


def assert_close(actual, expected, dtype, grad=False):
    if not grad:
        torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])
        return
    tol = GRAD_TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * scale
    )


def run_block(block, x, y):
    """Output and every gradient (x, y, parameters) of one forward + backward."""
    xr, yr = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    out = block(xr, yr)
    out.backward(torch.cos(xr.detach()))
    return [out, xr.grad, yr.grad] + [p.grad for p in block.parameters()]
