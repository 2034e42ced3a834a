"""The Triton backend's own guarantees. On CPU these run under Triton's interpreter
(`TRITON_INTERPRET=1`, as `make test` does in a second pytest run); on a GPU they run for real
(benchmarks/gpu_check.sh). The SPEC comparisons of test_ops.py run on it too (`-k triton`)."""
import copy

import pytest
import torch

import mutex_attn as ma
from conftest import assert_as_accurate, make_pair, run_block

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    "triton" not in ma.available_backends(DEVICE),
    reason="needs a CUDA GPU, or TRITON_INTERPRET=1 set before the test run",
)
LAYOUTS = ["contiguous", "channels_last"]
# L = 1, 49, several rows a program, and a long row that takes the multi-chunk loop.
SHAPES = [(2, 3, 1, 1), (3, 4, 7, 7), (2, 5, 6, 9), (1, 2, 64, 66)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mutex_attention_as_accurate_as_reference(shape, layout):
    x, y = make_pair(shape, torch.float32, layout, device=DEVICE)
    block = ma.MutexAttention(shape[1], backend="triton").to(DEVICE).train(shape[0] > 1)
    reference = copy.deepcopy(block)
    reference.backend = "reference"
    truth = run_block(copy.deepcopy(reference).double().cpu(), x.double().cpu(), y.double().cpu())
    assert_as_accurate(run_block(block, x, y), run_block(reference, x, y), truth, floor=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pieces_match_reference(shape, layout):
    """MAB alone and the unfused FAB (pool, gate, blend) with their own autograd."""
    x, y = make_pair(shape, torch.float32, layout, device=DEVICE)
    for backend_pair in (("triton", "reference"),):
        outs = []
        for backend in backend_pair:
            xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
            am = ma.mab(xr, yr, backend=backend)
            torch.manual_seed(1)
            fab = ma.FusionAttentionBlock(shape[1], backend=backend).to(DEVICE).eval()
            out = fab(am, yr)
            out.backward(torch.cos(xr.detach()))
            outs.append((am, out, xr.grad, yr.grad))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_layout_and_dtype_of_outputs():
    x, y = make_pair((2, 8, 5, 5), torch.float32, "channels_last", device=DEVICE)
    am = ma.mab(x, y, backend="triton")
    assert am.dtype == torch.float32
    assert am.is_contiguous(memory_format=torch.channels_last) and not am.is_contiguous()


def test_float64_is_a_clear_error():
    x, y = make_pair((2, 3, 4, 4), torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="computes in float32"):
        ma.mab(x, y, backend="triton")


def test_deterministic_bitwise():
    block = ma.MutexAttention(6, backend="triton").to(DEVICE)
    x, y = make_pair((3, 6, 9, 9), device=DEVICE)
    first = run_block(block, x, y)
    block.zero_grad()
    for a, b in zip(first, run_block(block, x, y)):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="fake-tensor tracing of Triton kernels needs a GPU")
def test_opcheck_and_compile_on_gpu():
    from test_native import op_cases

    for dtype in (torch.float32, torch.bfloat16):
        for name, args in op_cases(dtype, "channels_last", device="cuda").items():
            torch.library.opcheck(getattr(torch.ops.mutex_attn_triton, name).default, args)
    block = ma.MutexAttention(64, backend="triton").cuda()
    compiled = torch.compile(copy.deepcopy(block), fullgraph=True)
    x, y = make_pair((8, 64, 28, 28), device="cuda")
    truth_block = copy.deepcopy(block).double().cpu()
    truth_block.backend = "reference"
    truth = run_block(truth_block, x.double().cpu(), y.double().cpu())
    # each held to the float64 truth: the compiler rewrites the gate's float32 arithmetic
    assert_as_accurate(run_block(compiled, x, y), run_block(block, x, y), truth, floor=1e-5)
