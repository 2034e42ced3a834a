"""What a backend built from the mutex_attn kernels needs, shared by "native" (C++/CUDA) and
"triton": autograd for the MAB/FAB op pieces, the fused MutexAttention autograd function, and
the backend interface (mab, fab, mutex_attention) on top of them.

The fused path runs the four row kernels of SPEC §1:

    forward   K1 stats(x, y) -> v, row_max, row_sum, argmax        (x, y read twice)
              gate = G(v)                                          (tiny, plain tensor math)
              K2 apply(x, y, gate, row stats) -> out               (x, y read, out written)
    backward  K3 backward_stats(dout, x, y, ...) -> S1, Σdout·y, S2, am_k
              dgate = S1 − Σdout·y; G's backward by hand -> dv and the parameter grads
              K4 backward_apply(dout, x, y, gate, dv, ...) -> dx, dy

Only x, y and O(N·C) row statistics are saved; d, A, am and mix are recomputed. The gate
network's forward and backward are written out with tensor ops (no autograd inside backward),
so torch.compile can trace the whole block, in one of two forms:
  - on CUDA (FUSED_GATE_DEVICES), ATen's fused ops: one kernel per BatchNorm, which also updates
    the running statistics as nn.BatchNorm1d does (momentum=None aside: _cumulative_average).
    The gate's [N, C] tensors are tiny there and its cost is the host's time per launched op:
    measured on an H100, the written-out form (~90 ops) held every stage shape at ~2 ms.
  - elsewhere, op by op (_bn_forward, _bn_backward), with the running statistics updated after
    the autograd function: ATen's fused CPU BatchNorm is not bitwise stable across thread
    counts, and on CPU the kernels' time dwarfs the gate's ops.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mutex_attn._validation import check_gate, check_gate_precision

# Columns of K3's [N, C, 4] output; the same order as BackwardStat in csrc/row_math.h.
S1, DOUT_Y, S2, AM_AT_MAX = range(4)


def _bn_batch_stats(bn) -> bool:
    """Whether a BatchNorm normalises with the batch (True) or its running statistics."""
    return bn.training or bn.running_mean is None


def _bn_forward(h, weight, bias, mean, var, eps, batch_stats):
    if batch_stats:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    xhat = (h - mean) * rstd
    return xhat * weight + bias, xhat, rstd, mean, var


def _bn_backward(grad, xhat, rstd, weight, batch_stats):
    dweight, dbias = (grad * xhat).sum(0), grad.sum(0)
    dxhat = grad * weight
    if batch_stats:
        dxhat = dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).mean(0)
    return dxhat * rstd, dweight, dbias


def gate_forward(v, p, batch1, batch2, eps1, eps2):
    """GateNetwork's forward on plain tensors; p: GateParams in v's dtype. Returns the gate,
    what gate_backward needs, and the BatchNorm batch statistics (for the running ones)."""
    b1, xhat1, rstd1, mean1, var1 = _bn_forward(v @ p.W1.T, p.g1, p.b1, p.rm1, p.rv1, eps1, batch1)
    r1 = torch.relu(b1)
    b2, xhat2, rstd2, mean2, var2 = _bn_forward(r1 @ p.W2.T, p.g2, p.b2, p.rm2, p.rv2, eps2, batch2)
    z = torch.relu(b2)
    gate = torch.sigmoid(z @ (p.Wm - p.Wn).T + (p.bm - p.bn))
    saved = (xhat1, rstd1, b1, r1, xhat2, rstd2, b2, z)
    return gate, saved, (mean1, var1, mean2, var2)


def gate_backward(dgate, gate, v, p, saved, batch1, batch2):
    """dv and the parameter grads (W1, g1, b1, W2, g2, b2, Wm, bm, Wn, bn) of gate_forward."""
    xhat1, rstd1, b1, r1, xhat2, rstd2, b2, z = saved
    dlogit = dgate * gate * (1 - gate)
    dWm, dbm = dlogit.T @ z, dlogit.sum(0)
    dz = dlogit @ (p.Wm - p.Wn)
    dh2, dg2, db2 = _bn_backward(dz * (b2 > 0), xhat2, rstd2, p.g2, batch2)
    dW2 = dh2.T @ r1
    dh1, dg1, db1 = _bn_backward((dh2 @ p.W2) * (b1 > 0), xhat1, rstd1, p.g1, batch1)
    dW1 = dh1.T @ v
    dv = dh1 @ p.W1
    return dv, (dW1, dg1, db1, dW2, dg2, db2, dWm, dbm, -dWm, -dbm)


def _fused_bn_forward(h, weight, bias, running_mean, running_var, eps, batch_stats, factor, for_backward):
    """native_batch_norm; returns its output and what _fused_bn_backward needs: the running
    statistics (eval mode only) and the kernel's saved mean and 1/std. CUDA's backward wants
    the saved pair defined even in eval mode, where it reads the running statistics."""
    keep = batch_stats and factor is not None  # update the running statistics in the kernel
    if batch_stats and not keep:
        running_mean = running_var = None
    out, save_mean, save_invstd = torch.native_batch_norm(
        h, weight, bias, running_mean, running_var, batch_stats, factor if keep else 0.0, eps)
    # eval: copies, so that a training-mode forward before this backward (which updates the
    # module's statistics in place, unseen by autograd's version counters) cannot change it
    if batch_stats:
        running = (None, None)
    else:
        running = (running_mean.clone(), running_var.clone()) if for_backward else (running_mean, running_var)
    return out, (*running, save_mean, save_invstd)


def _fused_bn_backward(grad, h, weight, stats, batch_stats, eps):
    running_mean, running_var, save_mean, save_invstd = stats
    return _native_batch_norm_backward(grad, h, weight, running_mean, running_var, save_mean, save_invstd,
                                       batch_stats, eps, [True] * 3)


# (a name of its own so that tests can hold it to CUDA's argument contract on CPU)
_native_batch_norm_backward = torch.ops.aten.native_batch_norm_backward


def fused_gate_forward(v, p, batch1, batch2, eps1, eps2, factor1, factor2, for_backward=True):
    """gate_forward in ATen's fused ops (about a third as many). factorK: the running
    statistics' update factor of BatchNorm K (None: no update), applied in its kernel.
    Returns the gate and a flat tuple for fused_gate_backward."""
    h1 = v @ p.W1.T
    b1, stats1 = _fused_bn_forward(h1, p.g1, p.b1, p.rm1, p.rv1, eps1, batch1, factor1, for_backward)
    r1 = torch.relu(b1)
    h2 = r1 @ p.W2.T
    b2, stats2 = _fused_bn_forward(h2, p.g2, p.b2, p.rm2, p.rv2, eps2, batch2, factor2, for_backward)
    z = torch.relu(b2)
    w_diff = p.Wm - p.Wn
    gate = torch.sigmoid(torch.addmm(p.bm - p.bn, z, w_diff.T))
    return gate, (h1, *stats1, r1, h2, *stats2, z, w_diff)


def fused_gate_backward(dgate, gate, v, p, saved, batch1, batch2, eps1, eps2):
    """dv and the parameter grads of fused_gate_forward, as gate_backward."""
    # the flat tuple of fused_gate_forward; each stats is the 4-tuple of _fused_bn_forward
    h1, stats1, r1, h2, stats2, z, w_diff = saved[0], saved[1:5], saved[5], saved[6], saved[7:11], *saved[11:]
    dlogit = torch.ops.aten.sigmoid_backward(dgate, gate)
    dWm, dbm = dlogit.T @ z, dlogit.sum(0)
    dz = torch.ops.aten.threshold_backward(dlogit @ w_diff, z, 0)
    dh2, dg2, db2 = _fused_bn_backward(dz, h2, p.g2, stats2, batch2, eps2)
    dW2 = dh2.T @ r1
    dr1 = torch.ops.aten.threshold_backward(dh2 @ p.W2, r1, 0)
    dh1, dg1, db1 = _fused_bn_backward(dr1, h1, p.g1, stats1, batch1, eps1)
    return dh1 @ p.W1, (dh1.T @ v, dg1, db1, dW2, dg2, db2, dWm, dbm, -dWm, -dbm)


def _running_factor(bn):
    """nn.BatchNorm1d's update factor for this batch, after counting it; None: no update."""
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return None
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def _update_running_stats(bn, mean, var, n):
    """What nn.BatchNorm1d does in training mode (unbiased variance, momentum or cumulative)."""
    factor = _running_factor(bn)
    if factor is None:
        return
    with torch.no_grad():
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        unbiased = var * (n / (n - 1))
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


class GateParams(NamedTuple):
    """GateNetwork's parameters, then its BatchNorm running statistics (None in backward)."""
    W1: torch.Tensor
    g1: torch.Tensor
    b1: torch.Tensor
    W2: torch.Tensor
    g2: torch.Tensor
    b2: torch.Tensor
    Wm: torch.Tensor
    bm: torch.Tensor
    Wn: torch.Tensor
    bn: torch.Tensor
    rm1: Optional[torch.Tensor] = None
    rv1: Optional[torch.Tensor] = None
    rm2: Optional[torch.Tensor] = None
    rv2: Optional[torch.Tensor] = None


_NUM_PARAMS, _NUM_BUFFERS = 10, 4
# Where the gate network runs as ATen's fused ops (see the module docstring); tests add "cpu".
FUSED_GATE_DEVICES = {"cuda"}


def is_channels_last(t: torch.Tensor) -> bool:
    """Dense channels_last and not also NCHW-contiguous: the one layout the GPU kernels read
    as it is besides NCHW (the fake kernels and the kernels agree on this test)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _layout_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if is_channels_last(like) else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _gate_forward(ctx, v, tensors, batch1, batch2, eps1, eps2, factors):
    """The gate network's forward inside a fused autograd.Function: its parameters in v's
    (compute) dtype, the batch flags and parameter dtypes kept on ctx. factors: None for the
    op-by-op form, else the fused form's running-statistics update factors. Returns the gate,
    the tensors _gate_backward needs (to save) and the BatchNorm batch statistics (op-by-op
    form only: non-differentiable outputs of the Function, for the running ones)."""
    ctx.batch, ctx.eps, ctx.fused = (batch1, batch2), (eps1, eps2), factors is not None
    ctx.param_dtypes = [t.dtype for t in tensors[:_NUM_PARAMS]]
    p = GateParams(*[t if t is None or t.dtype == v.dtype else t.to(v.dtype) for t in tensors])
    if ctx.fused:
        gate, saved = fused_gate_forward(v, p, batch1, batch2, eps1, eps2, *factors, any(ctx.needs_input_grad))
        batch = ()
    else:
        gate, saved, batch = gate_forward(v, p, batch1, batch2, eps1, eps2)
        ctx.mark_non_differentiable(*batch)
    return gate, (*saved, *p[:_NUM_PARAMS]), batch


def _gate_backward(ctx, dgate, gate, v, gate_saved):
    """dv, and the Function's gradients for its gate arguments (parameters in their own
    dtypes, None for the running statistics), from what _gate_forward saved."""
    saved, params = gate_saved[:-_NUM_PARAMS], GateParams(*gate_saved[-_NUM_PARAMS:])
    if ctx.fused:
        dv, dparams = fused_gate_backward(dgate, gate, v, params, saved, *ctx.batch, *ctx.eps)
    else:
        dv, dparams = gate_backward(dgate, gate, v, params, saved, *ctx.batch)
    dparams = [g if g.dtype == dt else g.to(dt) for g, dt in zip(dparams, ctx.param_dtypes)]
    return dv, (*dparams, *([None] * _NUM_BUFFERS))


def _fused_gate(a, tensors) -> bool:
    """Whether the gate runs in the fused form: on FUSED_GATE_DEVICES, with its parameters and
    running statistics (`tensors`) already in the compute dtype (so the fused BatchNorm updates
    the module's own running statistics, not a converted copy)."""
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.device.type in FUSED_GATE_DEVICES and all(t is None or t.dtype == compute for t in tensors)


def _cumulative_average(bn) -> bool:
    """momentum=None: the update factor 1/num_batches_tracked changes every step, which
    torch.compile cannot pass into the fused BatchNorm as a constant; such a gate takes the
    op-by-op form, which updates the statistics after the autograd function."""
    return bn.momentum is None and bn.training and bn.track_running_stats


def _apply_with_gate(function, a, b, gate_net, what):
    """function.apply(a, b, ...) with the GateNetwork's parameters and BatchNorm state passed
    as tensors; the running statistics are updated as nn.BatchNorm1d would (by the fused
    BatchNorm kernels, or here after the function)."""
    g = gate_net
    check_gate_precision(a.dtype, g.fc1.weight.dtype)
    batch1, batch2 = _bn_batch_stats(g.bn1), _bn_batch_stats(g.bn2)
    if (batch1 or batch2) and a.shape[0] < 2:
        raise ValueError(
            f"{what} in training mode needs a batch of at least 2: the gate network's "
            f"BatchNorm normalises over the batch; got an input of shape {tuple(a.shape)}"
        )
    tensors = (
        g.fc1.weight, g.bn1.weight, g.bn1.bias, g.fc2.weight, g.bn2.weight, g.bn2.bias,
        g.fc_m.weight, g.fc_m.bias, g.fc_n.weight, g.fc_n.bias,
        g.bn1.running_mean, g.bn1.running_var, g.bn2.running_mean, g.bn2.running_var,
    )
    fused = _fused_gate(a, tensors) and not (_cumulative_average(g.bn1) or _cumulative_average(g.bn2))
    factors = (_running_factor(g.bn1), _running_factor(g.bn2)) if fused else None
    out, *batch = function.apply(a, b, batch1, batch2, g.bn1.eps, g.bn2.eps, factors, *tensors)
    if batch:
        mean1, var1, mean2, var2 = batch
        _update_running_stats(g.bn1, mean1, var1, a.shape[0])
        _update_running_stats(g.bn2, mean2, var2, a.shape[0])
    return out


def _add_pool_grad(grads, dv, argmax):
    """Adds the gradient of v = mean + max (over each row's positions) to every tensor in
    `grads`, in place: dv/L everywhere and dv once more at each row's first argmax. The same
    as adding fab_pool_backward's dense tensor, without writing and reading that tensor."""
    n, c, h, w = grads[0].shape
    rows = (torch.arange(n, device=dv.device)[:, None].expand(n, c),
            torch.arange(c, device=dv.device)[None, :].expand(n, c))
    at_max = (*rows, argmax // w, argmax % w)  # one position per row: no index repeats
    for g in grads:
        g.add_((dv / (h * w)).to(g.dtype)[:, :, None, None])
        g.index_put_(at_max, dv.to(g.dtype), accumulate=True)


def make_fused_fab(ops):
    """FAB with the GateNetwork as an autograd-aware function (am, y, gate_net): the pool and
    blend kernels with the gate network written out between them. Backward takes the blend's
    gradients and adds the pooling's rank-one-plus-argmax gradient in place (9 full-tensor
    passes instead of 12 when autograd sums a dense pooling gradient into both inputs)."""

    class FusedFab(torch.autograd.Function):
        @staticmethod
        def forward(ctx, am, y, batch1, batch2, eps1, eps2, factors, *tensors):
            with torch.autocast(am.device.type, enabled=False):
                v, argmax = ops.fab_pool(am, y)
                gate, gate_saved, batch = _gate_forward(ctx, v, tensors, batch1, batch2, eps1, eps2, factors)
                out = ops.fab_blend(am, y, gate)
            ctx.save_for_backward(am, y, v, gate, argmax, *gate_saved)
            return (out, *batch)

        @staticmethod
        def backward(ctx, dout, *_):
            am, y, v, gate, argmax, *gate_saved = ctx.saved_tensors
            with torch.autocast(am.device.type, enabled=False):
                dam, dy, dgate = ops.fab_blend_backward(dout, am, y, gate)
                dv, gate_grads = _gate_backward(ctx, dgate, gate, v, gate_saved)
                _add_pool_grad((dam, dy), dv, argmax)
            return (dam, dy, None, None, None, None, None, *gate_grads)

    def fab(am, y, gate_net):
        return _apply_with_gate(FusedFab, am, y, gate_net, "FAB")

    return fab


def make_fused_function(ops, reads_channels_last):
    """An autograd.Function for MutexAttention over the kernels `ops` (stats, apply,
    backward_stats, backward_apply). reads_channels_last(device): whether the kernels read
    channels_last in place there; if not, x and y are made NCHW once here (and saved so),
    instead of by each of the four kernels."""

    class FusedMutexAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y, batch1, batch2, eps1, eps2, factors, *tensors):
            if not (reads_channels_last(x.device) and is_channels_last(x)):
                x = x.contiguous()
            y = _layout_like(y, x)
            with torch.autocast(x.device.type, enabled=False):
                v, row_max, row_sum, argmax = ops.stats(x, y)
                gate, gate_saved, batch = _gate_forward(ctx, v, tensors, batch1, batch2, eps1, eps2, factors)
                out = ops.apply(x, y, gate, row_max, row_sum)
            ctx.save_for_backward(x, y, v, gate, row_max, row_sum, argmax, *gate_saved)
            return (out, *batch)

        @staticmethod
        def backward(ctx, dout, *_):
            x, y, v, gate, row_max, row_sum, argmax, *gate_saved = ctx.saved_tensors
            dout = _layout_like(dout, x)  # once, not in both K3 and K4
            with torch.autocast(x.device.type, enabled=False):
                stats = ops.backward_stats(dout, x, y, row_max, row_sum, argmax)
                dgate = stats[..., S1] - stats[..., DOUT_Y]
                dv, gate_grads = _gate_backward(ctx, dgate, gate, v, gate_saved)
                dx, dy = ops.backward_apply(dout, x, y, gate, dv, row_max, row_sum, argmax, stats)
            return (dx, dy, None, None, None, None, None, *gate_grads)

    def mutex_attention(x, y, gate_net):
        return _apply_with_gate(FusedMutexAttention, x, y, gate_net, "MutexAttention")

    return mutex_attention


def register_piece_autograd(namespace: str, ops) -> None:
    """Autograd for `namespace`::mab_forward, ::fab_pool and ::fab_blend, whose backward ops
    (ops.mab_backward, ops.fab_pool_backward, ops.fab_blend_backward) take saved inputs."""

    def mab_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output[1:])  # x, y, row_max, row_sum

    def mab_backward(ctx, dam, _drow_max, _drow_sum):
        x, y, row_max, row_sum = ctx.saved_tensors
        if dam is None:
            return None, None
        return tuple(ops.mab_backward(dam, x, y, row_max, row_sum))

    def pool_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[1])  # am (for its shape and layout), argmax

    def pool_backward(ctx, dv, _dargmax):
        am, argmax = ctx.saved_tensors
        if dv is None:
            return None, None
        dmix = ops.fab_pool_backward(dv, argmax, am)  # ∂v/∂am = ∂v/∂y: mix = am + y
        return dmix, dmix

    def blend_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def blend_backward(ctx, dout):
        am, y, gate = ctx.saved_tensors
        return tuple(ops.fab_blend_backward(dout, am, y, gate))

    torch.library.register_autograd(f"{namespace}::mab_forward", mab_backward, setup_context=mab_setup)
    torch.library.register_autograd(f"{namespace}::fab_pool", pool_backward, setup_context=pool_setup)
    torch.library.register_autograd(f"{namespace}::fab_blend", blend_backward, setup_context=blend_setup)


def make_backend(ops, gate_network_type, reads_channels_last):
    """The backend interface (mab, fab, mutex_attention) over the ten ops in `ops`."""
    fused_mutex_attention = make_fused_function(FusedKernels(ops), reads_channels_last)
    fused_fab = make_fused_fab(ops)

    def mab(x, y):
        return ops.mab_forward(x, y)[0]

    def fab(am, y, gate_net):
        if type(gate_net) is gate_network_type:  # the fused backward knows exactly this network
            return fused_fab(am, y, gate_net)
        v, _ = ops.fab_pool(am, y)
        gate = gate_net(v)
        check_gate(gate, am)
        return ops.fab_blend(am, y, gate.to(v.dtype))

    def mutex_attention(x, y, gate_net):
        if type(gate_net) is gate_network_type:  # the fused path knows exactly this network
            return fused_mutex_attention(x, y, gate_net)
        return fab(mab(x, y), y, gate_net)  # a custom gate: MAB and FAB ops, autograd between

    return mab, fab, mutex_attention


class FusedKernels:
    """The four fused-path kernels under the names make_fused_function uses."""

    def __init__(self, ops):
        self.stats = ops.mutex_attention_stats
        self.apply = ops.mutex_attention_apply
        self.backward_stats = ops.mutex_attention_backward_stats
        self.backward_apply = ops.mutex_attention_backward_apply
