"""The GPU backends (native CUDA kernels, Triton) on a GPU: every dtype and layout, the
ResNet-50 stage shapes, long rows, no hidden layout copies, determinism, opcheck,
torch.compile. Marked `cuda`; skipped where no GPU is visible. benchmarks/gpu_check.sh
runs them."""
import copy

import pytest
import torch

import mutex_attn as ma
from conftest import assert_as_accurate, make_pair, run_block, skip_float64

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GPU_BACKENDS = [b for b in ("native", "triton") if torch.cuda.is_available() and b in ma.available_backends("cuda")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]
# Small, the five ResNet-50 stage shapes (batch 4), L = 1, and long rows (16 900, 65 536).
SHAPES = [(2, 3, 5, 7), (4, 64, 56, 56), (4, 256, 56, 56), (4, 512, 28, 28), (4, 1024, 14, 14),
          (4, 2048, 7, 7), (3, 4, 1, 1), (2, 2, 130, 130), (2, 1, 256, 256)]
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


_TRUTH = {}


def _truth(key, compute):
    """The float64 CPU result for `key`: the same for every backend, and for contiguous and
    channels_last inputs (make_pair draws the same numbers), so computed once."""
    if key not in _TRUTH:
        _TRUTH[key] = compute()
    return _TRUTH[key]


def _skip_slow_float64(dtype, shape):
    if dtype == torch.float64 and shape[0] * shape[1] * shape[2] * shape[3] > 500_000:
        pytest.skip("float64 is for gradcheck-sized checks; the stage shapes run in the fast dtypes")


def _blocks(channels, device, backend="native"):
    block = ma.MutexAttention(channels, backend=backend).to(device)
    reference = copy.deepcopy(block)
    reference.backend = "reference"
    return block, reference


def test_gpu_backends_are_built():
    assert "native" in GPU_BACKENDS, ma.backends.unavailable_reason("native", "cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mutex_attention_cuda_as_accurate_as_reference(backend, shape, dtype, layout):
    skip_float64(backend, dtype)
    _skip_slow_float64(dtype, shape)
    x, y = make_pair(shape, dtype, layout, device="cuda")
    block, reference = _blocks(shape[1], "cuda", backend)
    if dtype == torch.float64:
        block.double(), reference.double()
    truth = _truth(("mutex_attention", shape, dtype, layout == "noncontiguous"), lambda: run_block(
        copy.deepcopy(reference).double().cpu(), x.double().cpu(), y.double().cpu()))
    got = run_block(block, x, y)
    assert got[0].dtype == dtype
    assert_as_accurate(got, run_block(reference, x, y), truth, FLOOR[dtype])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mab_cuda_as_accurate_as_reference(backend, shape, dtype, layout):
    skip_float64(backend, dtype)
    _skip_slow_float64(dtype, shape)
    x, y = make_pair(shape, dtype, layout, device="cuda")

    def run(backend, a, b):
        a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        am = ma.mab(a, b, backend=backend)
        return [am, *torch.autograd.grad(am, (a, b), torch.cos(a.detach()))]

    truth = _truth(("mab", shape, dtype, layout == "noncontiguous"), lambda: run("reference", x.double().cpu(), y.double().cpu()))
    assert_as_accurate(run(backend, x, y), run("reference", x, y), truth, FLOOR[dtype])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", ["mab", "mutex_attention"])
def test_channels_last_stays_channels_last(backend, op):
    x, y = make_pair((4, 64, 14, 14), torch.float16, "channels_last", device="cuda")
    x.requires_grad_()
    block = ma.MutexAttention(64, backend=backend).cuda()
    out = ma.mab(x, y, backend=backend) if op == "mab" else block(x, y)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic_bitwise_cuda(backend):
    block, _ = _blocks(256, "cuda", backend)
    x, y = make_pair((8, 256, 28, 28), torch.bfloat16, "channels_last", device="cuda")
    first = run_block(block, x, y)
    for _ in range(2):
        block.zero_grad()
        for a, b in zip(first, run_block(block, x, y)):
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


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_cuda(backend):
    """Compiled (fullgraph) as accurate as eager against float64: the compiler rewrites the
    gate network's float32 arithmetic, so the two need not agree to the last bits."""
    block, reference = _blocks(64, "cuda", backend)
    compiled_module = copy.deepcopy(block)
    compiled = torch.compile(compiled_module, fullgraph=True)
    x, y = make_pair((8, 64, 28, 28), torch.float32, "channels_last", device="cuda")
    truth = run_block(copy.deepcopy(reference).double().cpu(), x.double().cpu(), y.double().cpu())
    eager = run_block(block, x, y)
    assert_as_accurate(eager, run_block(reference, x, y), truth, FLOOR[torch.float32])
    assert_as_accurate(run_block(compiled, x, y), eager, truth, FLOOR[torch.float32])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("block_cls", ["mutex_attention", "fab"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eval_mode_gradients_cuda(backend, block_cls, dtype):
    """Eval mode (running statistics) forward + backward, as Grad-CAM runs it. The fused CUDA
    gate's BatchNorm backward takes other arguments there; it failed on the H100 once."""
    from test_ops import _randomize_bn

    if block_cls == "fab":
        block = ma.FusionAttentionBlock(64, backend=backend).cuda()
        _randomize_bn(type("B", (), {"fab": block}))
    else:
        block = ma.MutexAttention(64, backend=backend).cuda()
        _randomize_bn(block)
    block.eval()
    reference = copy.deepcopy(block)
    reference.backend = "reference"
    x, y = make_pair((4, 64, 14, 14), dtype, "channels_last", device="cuda")
    truth = run_block(copy.deepcopy(reference).double().cpu(), x.double().cpu(), y.double().cpu())
    assert_as_accurate(run_block(block, x, y), run_block(reference, x, y), truth, FLOOR[dtype])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_huge_distances_stay_finite_cuda(backend):
    """d ~ 1e30: a fused multiply-add across d − max would overflow the softmax."""
    x, y = make_pair((2, 8, 9, 9), device="cuda")
    x = x * 1e15
    block = ma.MutexAttention(8, backend=backend).cuda().eval()
    assert torch.isfinite(ma.mab(x, y, backend=backend)).all()
    assert torch.isfinite(block(x, y)).all()
    torch.testing.assert_close(ma.mab(x, y, backend=backend), ma.mab(x, y, backend="reference"))
