"""The native backend's own guarantees: op registration (opcheck), agreement with the
reference on odd sizes, BatchNorm running statistics, determinism, torch.compile.
(The SPEC comparisons in test_ops.py and test_validation.py run on it too.)"""
import copy

import pytest
import torch

import mutex_attn as ma
from conftest import assert_as_accurate, make_pair, run_block

pytestmark = pytest.mark.skipif(
    "native" not in ma.available_backends("cpu"), reason="the C++ extension is not built"
)
if "native" in ma.available_backends("cpu"):
    from mutex_attn.backends import native

    ops = torch.ops.mutex_attn


def op_cases(dtype=torch.float32, layout="contiguous", shape=(2, 3, 5, 7), device="cpu"):
    """Valid arguments for every op (used by opcheck here and in test_cuda.py)."""
    x, y = make_pair(shape, dtype, layout, device=device)
    dout = make_pair(shape, dtype, layout, device=device)[0]
    n, c = shape[:2]
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    gate, dv = torch.rand(n, c, dtype=cd, device=device), torch.randn(n, c, dtype=cd, device=device)
    v, mu, z, k = ops.mutex_attention_stats(x, y)
    stats = ops.mutex_attention_backward_stats(dout, x, y, mu, z, k)
    _, mab_mu, mab_z = ops.mab_forward(x, y)
    return {
        "mab_forward": (x.clone().requires_grad_(), y.clone().requires_grad_()),
        "mab_backward": (dout, x, y, mab_mu, mab_z),
        "fab_pool": (x.clone().requires_grad_(), y.clone().requires_grad_()),
        "fab_pool_backward": (dv, k, x),
        "fab_blend": (x.clone().requires_grad_(), y.clone().requires_grad_(), gate.clone().requires_grad_()),
        "fab_blend_backward": (dout, x, y, gate),
        "mutex_attention_stats": (x, y),
        "mutex_attention_apply": (x, y, gate, mu, z),
        "mutex_attention_backward_stats": (dout, x, y, mu, z, k),
        "mutex_attention_backward_apply": (dout, x, y, gate, dv, mu, z, k, stats),
    }


@pytest.mark.parametrize("name", native._OPS if "native" in ma.available_backends("cpu") else [])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(name, dtype, layout):
    args = op_cases(dtype, layout)[name]
    torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 5, 7, 7), (2, 4, 56, 56), (1, 2, 130, 130)])
def test_odd_sizes_as_accurate_as_reference(shape):
    """L = 1, 49, 3136 and 16 900; batch 1 in eval mode. Truth: the reference in float64.
    Native float32 must be within the float32 tolerance of the truth, or at worst twice as
    far as the reference float32 (BatchNorm over a batch of 2 amplifies rounding)."""
    x, y = make_pair(shape)
    nat = ma.MutexAttention(shape[1], backend="native").train(shape[0] > 1)
    ref = copy.deepcopy(nat)
    ref.backend = "reference"
    truth = run_block(copy.deepcopy(ref).double(), x.double(), y.double())
    assert_as_accurate(run_block(nat, x, y), run_block(ref, x, y), truth, floor=1e-5)
    torch.testing.assert_close(ma.mab(x, y, backend="native"), ma.mab(x, y, backend="reference"))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_running_stats_follow_nn_batchnorm(momentum):
    nat = ma.MutexAttention(6, backend="native")
    for bn in (nat.fab.gate.bn1, nat.fab.gate.bn2):
        bn.momentum = momentum
    ref = copy.deepcopy(nat)
    ref.backend = "reference"
    for _ in range(3):
        x, y = make_pair((5, 6, 4, 4))
        nat(x, y), ref(x, y)
    for (name, a), (_, b) in zip(nat.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert nat.fab.gate.bn1.num_batches_tracked.item() == 3


def test_training_batch_of_one_is_a_clear_error():
    x, y = make_pair((1, 4, 3, 3))
    with pytest.raises(ValueError, match="batch of at least 2"):
        ma.MutexAttention(4, backend="native").train()(x, y)


@pytest.mark.parametrize("threads", [1, 2])
def test_deterministic_bitwise(threads):
    """Run after run, and whatever the thread count, the same bits (rows reduce in one order)."""
    block = ma.MutexAttention(16, backend="native")
    x, y = make_pair((4, 16, 24, 24))
    dout = torch.randn(4, 16, 24, 24)

    def run():
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        out = block(xr, yr)
        out.backward(dout)
        return out, xr.grad, yr.grad, block.fab.gate.fc_m.weight.grad.clone()

    before = torch.get_num_threads()
    first = run()
    torch.set_num_threads(threads)
    try:
        for _ in range(2):
            block.zero_grad()
            for a, b in zip(first, run()):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(2, 5, 1, 1), (2, 17, 7, 7), (3, 40, 9, 11)])
def test_channels_last_is_read_in_place_on_cpu(shape):
    """The fused kernels walk channels_last directly (channel blocks of 16, with partial ones):
    channels_last in, channels_last out and grads, the same values as the NCHW kernels up to
    summation order, and bitwise reproducible whatever the thread count."""
    x, y = make_pair(shape)
    dout = torch.randn(shape)
    block = ma.MutexAttention(shape[1], backend="native")
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731

    def run(a, b, g):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = block(a, b)
        out.backward(g)
        return out, a.grad, b.grad

    # eval mode for the comparison: in training the gate's BatchNorm over a batch of 2-3
    # amplifies the rounding differences of the two summation orders
    block.eval()
    nchw = run(x, y, dout)
    nhwc = run(cl(x), cl(y), cl(dout))
    for t in nhwc:
        assert t.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(nhwc, nchw):  # float32 sums over up to 99 positions, in two orders
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    block.train()
    nhwc = run(cl(x), cl(y), cl(dout))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = run(cl(x), cl(y), cl(dout))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(nhwc, again):
        assert torch.equal(a, b)


def test_custom_gate_takes_the_unfused_path():
    class HalfGate(torch.nn.Module):
        def forward(self, v):
            return torch.full_like(v, 0.5)

    x, y = make_pair((2, 3, 4, 5))
    nat, ref = ma.MutexAttention(3, backend="native"), ma.MutexAttention(3, backend="reference")
    nat.fab.gate = ref.fab.gate = HalfGate()
    torch.testing.assert_close(nat(x, y), ref(x, y))


def test_cuda_availability_message(monkeypatch):
    monkeypatch.setattr(native, "_has_kernel", lambda device_type: device_type == "cpu")
    reason = native.unavailable_reason(torch.device("cuda"))
    assert "FORCE_CUDA=1" in reason


def test_compile_fullgraph_mab():
    x, y = make_pair((2, 8, 6, 7))
    x.requires_grad_()
    fn = torch.compile(lambda a, b: ma.mab(a, b, backend="native"), fullgraph=True)
    out = fn(x, y)
    (dx,) = torch.autograd.grad(out.square().sum(), x)
    ref = ma.mab(x, y, backend="native")
    (rdx,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dx, rdx)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_fullgraph_mutex_attention_matches_eager(momentum):
    """Compiled (fullgraph) is as accurate as eager against float64, with the same BatchNorm
    running statistics. (The compiler rewrites the gate network's float32 arithmetic, so the
    two need not agree to the last bits: each is held to the float64 truth.)"""
    eager = ma.MutexAttention(8, backend="native")
    for bn in (eager.fab.gate.bn1, eager.fab.gate.bn2):
        bn.momentum = momentum
    compiled_module = copy.deepcopy(eager)
    truth_module = copy.deepcopy(eager).double()
    truth_module.backend = "reference"
    compiled = torch.compile(compiled_module, fullgraph=True)
    x, y = make_pair((3, 8, 5, 6))
    truth = run_block(truth_module, x.double(), y.double())
    assert_as_accurate(run_block(compiled, x, y), run_block(eager, x, y), truth, floor=1e-5)
    for name, a in compiled_module.named_buffers():
        torch.testing.assert_close(a, dict(eager.named_buffers())[name], rtol=1e-5, atol=1e-6, msg=name)


def test_direct_op_calls_with_bad_arguments():
    """The ops guard themselves too: no positions is an error, a bad argmax gives NaN."""
    x, y = make_pair((2, 3, 0, 4))
    for call in (lambda: ops.mab_forward(x, y), lambda: ops.mutex_attention_stats(x, y),
                 lambda: ops.fab_pool(x, y)):
        with pytest.raises(RuntimeError, match="needs H·W >= 1"):
            call()
    x, y = make_pair((2, 3, 4, 4))
    dout = torch.randn(2, 3, 4, 4)
    v, mu, z, k = ops.mutex_attention_stats(x, y)
    bad = k.clone()
    bad[1, 2] = 99
    stats = ops.mutex_attention_backward_stats(dout, x, y, mu, z, bad)
    assert torch.isnan(stats[1, 2, 3]) and not torch.isnan(stats[0]).any()
    dx, dy = ops.mutex_attention_backward_apply(dout, x, y, torch.rand(2, 3), torch.randn(2, 3), mu, z, bad, stats)
    assert torch.isnan(dx[1, 2]).all() and torch.isfinite(dx[0]).all()
    dmix = ops.fab_pool_backward(torch.randn(2, 3), bad, x)
    assert torch.isnan(dmix[1, 2]).all() and torch.isfinite(dmix[0]).all()
    with pytest.raises(RuntimeError, match="same shape"):
        ops.mab_forward(x, y[:1])


# ------------------------------------------------------------------ the gate network's CUDA form
@pytest.fixture
def fused_gate_on_cpu(monkeypatch):
    """Runs the gate network in the form CUDA uses (ATen's fused BatchNorm) on CPU too, and
    counts the fused forwards, so a test can show that form really ran."""
    from mutex_attn.backends import kernel_backend

    calls = []
    original = kernel_backend.fused_gate_forward

    def counted(*args):
        calls.append(1)
        return original(*args)

    def cuda_contract(grad, h, weight, running_mean, running_var, save_mean, save_invstd, train, *rest):
        # CUDA's kernel asserts these are defined, in eval mode too (CPU's does not): found
        # on an H100, where every eval-mode backward through the fused gate failed.
        assert save_mean is not None and save_invstd is not None, "CUDA needs save_mean/save_invstd"
        assert train or (running_mean is not None and running_var is not None)
        return torch.ops.aten.native_batch_norm_backward(
            grad, h, weight, running_mean, running_var, save_mean, save_invstd, train, *rest)

    monkeypatch.setattr(kernel_backend, "FUSED_GATE_DEVICES", {"cpu", "cuda"})
    monkeypatch.setattr(kernel_backend, "fused_gate_forward", counted)
    monkeypatch.setattr(kernel_backend, "_native_batch_norm_backward", cuda_contract)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_gate_form_matches_spec(fused_gate_on_cpu, dtype, layout, training):
    import test_ops

    test_ops.test_mutex_attention_matches_spec("native", dtype, layout, training)
    test_ops.test_fab_matches_spec("native", layout)
    assert len(fused_gate_on_cpu) == 2


@pytest.mark.parametrize("block_cls", ["fab", "mutex_attention"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_gate_form_gradcheck(fused_gate_on_cpu, block_cls, training):
    import test_ops

    test_ops.test_gradcheck_blocks_with_parameters("native", block_cls, training)
    assert fused_gate_on_cpu


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_gate_form_running_stats_follow_nn_batchnorm(fused_gate_on_cpu, momentum):
    test_batchnorm_running_stats_follow_nn_batchnorm(momentum)
    # momentum=None (a cumulative average) takes the op-by-op form, which compiles
    assert len(fused_gate_on_cpu) == (3 if momentum is not None else 0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_gate_form_compiles_fullgraph(monkeypatch, momentum):
    from mutex_attn.backends import kernel_backend

    # (not the counting fixture: dynamo cannot trace its list.append inside the Function)
    monkeypatch.setattr(kernel_backend, "FUSED_GATE_DEVICES", {"cpu", "cuda"})
    assert kernel_backend._fused_gate(torch.ones(1), list(ma.MutexAttention(8).fab.gate.parameters()))
    test_compile_fullgraph_mutex_attention_matches_eager(momentum)


def test_fused_gate_form_eval_backward_ignores_later_updates(fused_gate_on_cpu):
    """eval forward, then a training forward (updating the running statistics in place), then
    the eval backward: the gradients are those of the statistics the forward used."""
    block = ma.MutexAttention(6, backend="native")
    x, y = make_pair((4, 6, 5, 5))
    expected = run_block(copy.deepcopy(block).eval(), x, y)
    block.eval()
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = block(xr, yr)
    block.train()(*make_pair((4, 6, 5, 5)))  # moves the running statistics
    out.backward(torch.cos(xr.detach()))
    got = [out, xr.grad, yr.grad] + [p.grad for p in block.parameters()]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_fused_gate_form_only_with_compute_dtype_parameters(fused_gate_on_cpu):
    """A float64 module on float32 inputs converts its parameters: the op-by-op form, which
    updates the module's running statistics itself."""
    block = ma.MutexAttention(4, backend="native").double()
    x, y = make_pair((3, 4, 5, 5))
    block(x, y)
    assert not fused_gate_on_cpu
    assert block.fab.gate.bn1.num_batches_tracked.item() == 1
