"""Every CPU backend against the SPEC §1 equations (tests/spec_oracle.py): forward values and
gradients, in every dtype and layout, on fresh random inputs; plus the numerical edge cases."""
import copy

import pytest
import torch
from torch.func import functional_call

import mutex_attn as ma
import spec_oracle as spec
from conftest import CPU_BACKENDS, assert_close, float_dtype, make_pair, skip_float64

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]
SHAPES = [(2, 3, 5, 7), (1, 4, 1, 1), (3, 2, 7, 7), (2, 3, 1, 13)]


def oracle_mutex_attention(block, x, y, dout):
    """Forward and gradients of FAB(MAB(x, y), y) from the SPEC formulas; the gate network's
    own backward (tiny, plain PyTorch) is done by autograd in float64."""
    gate_net = copy.deepcopy(block.fab.gate).double()
    am = spec.mab_forward(x, y)
    v = spec.fab_pool(am, y).requires_grad_()
    gate = gate_net(v)
    out = spec.fab_forward(am, y, gate.detach())
    dam, dy_fab, dgate = spec.fab_backward(dout, am, y, gate.detach(), torch.zeros_like(v))
    params = list(gate_net.parameters())
    dv, *dparams = torch.autograd.grad(gate, [v] + params, dgate)
    dam, dy_fab, _ = spec.fab_backward(dout, am, y, gate.detach(), dv)
    dx, dy_mab = spec.mab_backward(dam, x, y)
    return out, dx, dy_fab + dy_mab, dparams


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_mab_matches_spec(backend, dtype, layout, shape):
    skip_float64(backend, dtype)
    x, y = make_pair(shape, dtype, layout)
    x.requires_grad_()
    y.requires_grad_()
    am = ma.mab(x, y, backend=backend)
    assert am.dtype == dtype and am.shape == x.shape
    assert_close(am, spec.mab_forward(x.detach(), y.detach()), dtype)
    dam = torch.randn(shape, dtype=torch.float64).to(dtype)
    dx, dy = torch.autograd.grad(am, (x, y), dam)
    ex, ey = spec.mab_backward(dam, x.detach(), y.detach())
    assert_close(dx, ex, dtype, grad=True)
    assert_close(dy, ey, dtype, grad=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_mutex_attention_matches_spec(backend, dtype, layout, training):
    skip_float64(backend, dtype)
    shape = (4, 6, 5, 7)
    block = ma.MutexAttention(6, backend=backend)
    if dtype == torch.float64:
        block.double()
    _randomize_bn(block)
    block.train(training)
    x, y = make_pair(shape, dtype, layout)
    x.requires_grad_()
    y.requires_grad_()
    out = block(x, y)
    assert out.dtype == dtype
    dout = torch.randn(shape, dtype=torch.float64).to(dtype)
    params = list(block.parameters())
    dx, dy, *dparams = torch.autograd.grad(out, [x, y] + params, dout)

    eout, edx, edy, edparams = oracle_mutex_attention(block, x.detach(), y.detach(), dout)
    # fp16/bf16 backends round the inputs of the gate network to float32 and their own
    # outputs to the input dtype; compare at that dtype's tolerance.
    assert_close(out, eout, dtype)
    assert_close(dx, edx, dtype, grad=True)
    assert_close(dy, edy, dtype, grad=True)
    for got, want in zip(dparams, edparams):
        assert_close(got, want, dtype, grad=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fab_matches_spec(backend, layout):
    shape = (3, 5, 4, 6)
    dtype = float_dtype(backend)
    fab = ma.FusionAttentionBlock(5, backend=backend).to(dtype)
    am, y = make_pair(shape, dtype, layout)
    am.requires_grad_()
    y.requires_grad_()
    out = fab(am, y)
    dout = torch.randn(shape, dtype=dtype)
    dam, dy = torch.autograd.grad(out, (am, y), dout)

    gate_net = copy.deepcopy(fab.gate).double()
    v = spec.fab_pool(am.detach(), y.detach()).requires_grad_()
    gate = gate_net(v)
    assert_close(out, spec.fab_forward(am.detach(), y.detach(), gate.detach()), dtype)
    _, _, dgate = spec.fab_backward(dout, am.detach(), y.detach(), gate.detach(), torch.zeros_like(v))
    (dv,) = torch.autograd.grad(gate, v, dgate)
    edam, edy, _ = spec.fab_backward(dout, am.detach(), y.detach(), gate.detach(), dv)
    assert_close(dam, edam, dtype, grad=True)
    assert_close(dy, edy, dtype, grad=True)


def _randomize_bn(block):
    """Non-trivial running statistics and affine parameters, so that eval mode is tested too."""
    with torch.no_grad():
        for bn in (block.fab.gate.bn1, block.fab.gate.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)


def _with_params(module, inputs):
    """gradcheck over the inputs and every parameter of `module`."""
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())

    def fn(*args):
        tensors, ps = args[: len(inputs)], args[len(inputs):]
        return functional_call(module, dict(zip(names, ps)), tensors)

    return fn, tuple(inputs) + params


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_mab(backend):
    skip_float64(backend, torch.float64)
    x, y = make_pair((2, 3, 4, 5), torch.float64)
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ma.mab(a, b, backend=backend), (x, y))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("block_cls", ["fab", "mutex_attention"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_blocks_with_parameters(backend, block_cls, training):
    skip_float64(backend, torch.float64)
    if block_cls == "fab":
        block = ma.FusionAttentionBlock(4, backend=backend).double()
        block_for_bn = type("B", (), {"fab": block})
    else:
        block = ma.MutexAttention(4, backend=backend).double()
        block_for_bn = block
    _randomize_bn(block_for_bn)
    block.train(training)
    x, y = make_pair((3, 4, 3, 5), torch.float64)
    fn, inputs = _with_params(block, [x.requires_grad_(), y.requires_grad_()])
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
def test_layouts_give_the_same_numbers(backend, layout):
    block = ma.MutexAttention(8, backend=backend).eval()
    x, y = make_pair((2, 8, 6, 5), torch.float32, layout)
    xc, yc = x.contiguous(), y.contiguous()
    torch.testing.assert_close(block(x, y), block(xc, yc), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ma.mab(x, y, backend=backend), ma.mab(xc, yc, backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_invariance_eval(backend):
    block = ma.MutexAttention(8, backend=backend)
    _randomize_bn(block)
    block.eval()
    x, y = make_pair((5, 8, 6, 6))
    full_mab, full = ma.mab(x, y, backend=backend), block(x, y)
    for i in range(5):
        assert torch.equal(ma.mab(x[i : i + 1], y[i : i + 1], backend=backend), full_mab[i : i + 1])
        torch.testing.assert_close(block(x[i : i + 1], y[i : i + 1]), full[i : i + 1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmax_is_per_sample_per_channel_over_hw(backend):
    x, y = make_pair((3, 4, 5, 6))
    y = y.abs() + 0.5  # so that A = am / y is well defined
    am = ma.mab(x, y, backend=backend)
    a = (am / y).flatten(2)
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 4), rtol=1e-5, atol=1e-6)
    # Changing one (sample, channel) row changes that row's output only.
    x2 = x.clone()
    x2[1, 2] += torch.randn(5, 6)
    am2 = ma.mab(x2, y, backend=backend)
    changed = (am2 != am).flatten(2).any(-1)
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_max_gradient_goes_to_first_tied_position(backend):
    # FAB with y = 0: mix = am; the row max 3 is attained at positions 1 and 3.
    dtype = float_dtype(backend)  # the values below are exact in float32 too
    fab = ma.FusionAttentionBlock(2, backend=backend).to(dtype).eval()
    am = torch.tensor([[1.0, 3.0, 0.0, 3.0, 2.0], [0.5, 0.25, 0.5, -1.0, 0.0]], dtype=dtype)
    am = am.reshape(1, 2, 1, 5).requires_grad_()
    y = torch.zeros_like(am)
    out = fab(am, y)
    (dam,) = torch.autograd.grad(out, am, torch.ones_like(out))
    d = dam.reshape(2, 5) - dam.reshape(2, 5)[:, 4:]  # relative to a non-max position
    assert d[0, 1].abs() > 1e-6 and d[0, 3].abs() < 1e-12  # first tie (index 1) only
    assert d[1, 0].abs() > 1e-6 and d[1, 2].abs() < 1e-12  # first tie (index 0) only

    # The same through MutexAttention: x = y makes A uniform, so mix = y (1 + 1/L) keeps the ties.
    block = ma.MutexAttention(2, backend=backend).to(dtype).eval()
    y = am.detach().clone().requires_grad_()
    x = y.detach().clone()
    out = block(x, y)
    (dy,) = torch.autograd.grad(out, y, torch.ones_like(out))
    d = dy.reshape(2, 5) - dy.reshape(2, 5)[:, 4:]
    assert d[0, 1].abs() > 1e-6 and d[0, 3].abs() < 1e-12
    assert d[1, 0].abs() > 1e-6 and d[1, 2].abs() < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_single_position_rows(backend):
    x, y = make_pair((2, 3, 1, 1))
    assert torch.equal(ma.mab(x, y, backend=backend), y)  # A = 1
    block = ma.MutexAttention(3, backend=backend).eval()
    out = block(x, y)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_long_row(backend):
    shape = (1, 2, 128, 130)  # 16 640 positions in one row
    x, y = make_pair(shape)
    x.requires_grad_()
    am = ma.mab(x, y, backend=backend)
    assert_close(am, spec.mab_forward(x.detach(), y), torch.float32)
    dam = torch.randn(shape)
    (dx,) = torch.autograd.grad(am, x, dam)
    assert_close(dx, spec.mab_backward(dam, x.detach(), y)[0], torch.float32, grad=True)
    block = ma.MutexAttention(2, backend=backend).eval()
    x, y = make_pair(shape)
    eout, *_ = oracle_mutex_attention(block, x, y, torch.zeros(shape))
    assert_close(block(x, y), eout, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_huge_distances_stay_finite(backend):
    x, y = make_pair((2, 3, 4, 4))
    x = x * 1e15  # d ~ 1e30: exp would overflow without subtracting the row max
    am = ma.mab(x, y, backend=backend)
    assert torch.isfinite(am).all()
    assert_close(am, spec.mab_forward(x, y), torch.float32)
    out = ma.MutexAttention(3, backend=backend).eval()(x, y)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_stays_in_its_row(backend):
    x, y = make_pair((2, 3, 4, 4))
    x_nan = x.clone()
    x_nan[1, 2, 0, 3] = float("nan")
    am, am_nan = ma.mab(x, y, backend=backend), ma.mab(x_nan, y, backend=backend)
    assert torch.isnan(am_nan[1, 2]).all()
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.equal(am_nan[keep], am[keep])
    # Through the gate network (mixes channels, eval mode) NaN reaches its sample, never others.
    block = ma.MutexAttention(3, backend=backend).eval()
    out = block(x_nan, y)
    assert torch.isnan(out[1]).any() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    x, y = make_pair((0, 3, 4, 4))
    assert ma.mab(x, y, backend=backend).shape == (0, 3, 4, 4)
    assert ma.MutexAttention(3, backend=backend)(x, y).shape == (0, 3, 4, 4)
    assert ma.FusionAttentionBlock(3, backend=backend)(x, y).shape == (0, 3, 4, 4)
