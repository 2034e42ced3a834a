"""The CUDA kernels (native backend) on a GPU: every dtype and layout, the ResNet-50 stage
shapes, long rows, no hidden layout copies, determinism, opcheck, torch.compile.
Marked `cuda`; skipped where no GPU is visible. benchmarks/gpu_check.sh runs them."""
import copy

import pytest
import torch

import mutex_attn as ma
from conftest import assert_as_accurate, make_pair, run_block

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or "native" not in ma.available_backends("cuda"),
        reason="needs a CUDA GPU and the extension built with CUDA",
    ),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]
# Small, the five ResNet-50 stage shapes (batch 4), L = 1, and long rows (16 900, 65 536).
SHAPES = [(2, 3, 5, 7), (4, 64, 56, 56), (4, 256, 56, 56), (4, 512, 28, 28), (4, 1024, 14, 14),
          (4, 2048, 7, 7), (3, 4, 1, 1), (2, 2, 130, 130), (2, 1, 256, 256)]
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _blocks(channels, device):
    native = ma.MutexAttention(channels, backend="native").to(device)
    reference = copy.deepcopy(native)
    reference.backend = "reference"
    return native, reference


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mutex_attention_cuda_as_accurate_as_reference(shape, dtype, layout):
    x, y = make_pair(shape, dtype, layout, device="cuda")
    native, reference = _blocks(shape[1], "cuda")
    if dtype == torch.float64:
        native.double(), reference.double()
    truth = run_block(copy.deepcopy(reference).double().cpu(), x.double().cpu(), y.double().cpu())
    got = run_block(native, x, y)
    assert got[0].dtype == dtype
    assert_as_accurate(got, run_block(reference, x, y), truth, FLOOR[dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mab_cuda_as_accurate_as_reference(shape, dtype, layout):
    x, y = make_pair(shape, dtype, layout, device="cuda")

    def run(backend, a, b):
        a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        am = ma.mab(a, b, backend=backend)
        return [am, *torch.autograd.grad(am, (a, b), torch.cos(a.detach()))]

    truth = run("reference", x.double().cpu(), y.double().cpu())
    assert_as_accurate(run("native", x, y), run("reference", x, y), truth, FLOOR[dtype])


@pytest.mark.parametrize("op", ["mab", "mutex_attention"])
def test_channels_last_stays_channels_last(op):
    x, y = make_pair((4, 64, 14, 14), torch.float16, "channels_last", device="cuda")
    x.requires_grad_()
    block = ma.MutexAttention(64, backend="native").cuda()
    out = ma.mab(x, y, backend="native") if op == "mab" else block(x, y)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert dx.is_contiguous(memory_format=torch.channels_last)


def test_deterministic_bitwise_cuda():
    native, _ = _blocks(256, "cuda")
    x, y = make_pair((8, 256, 28, 28), torch.bfloat16, "channels_last", device="cuda")
    first = run_block(native, x, y)
    for _ in range(2):
        native.zero_grad()
        for a, b in zip(first, run_block(native, x, y)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_cuda(dtype, layout):
    from test_native import op_cases

    for name, args in op_cases(dtype, layout, device="cuda").items():
        torch.library.opcheck(getattr(torch.ops.mutex_attn, name).default, args)


def test_gradcheck_cuda_float64():
    block = ma.MutexAttention(4, backend="native").cuda().double()
    x, y = make_pair((3, 4, 3, 5), torch.float64, device="cuda")
    names = [n for n, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())
    fn = lambda a, b, *ps: torch.func.functional_call(block, dict(zip(names, ps)), (a, b))
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), y.requires_grad_()) + params)


def test_compile_fullgraph_cuda():
    native, _ = _blocks(64, "cuda")
    compiled_module = copy.deepcopy(native)
    compiled = torch.compile(compiled_module, fullgraph=True)
    x, y = make_pair((8, 64, 28, 28), torch.float32, "channels_last", device="cuda")
    for a, b in zip(run_block(native, x, y), run_block(compiled, x, y)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
