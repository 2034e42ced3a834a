"""Triton kernels of the mutex_attn ops (the same math as csrc/row_math.h, SPEC §1).

Every kernel works on a tile of BLOCK_R rows (a row = one (sample, channel) pair) and loops
over the row's L = H·W positions in chunks of BLOCK_L, so any L works: one chunk for short
rows, a loop (online softmax) for long ones. Element (n, c, l) lives at n·sN + c·sC + l·sL,
which covers NCHW (sL = 1) and channels_last (sC = 1, sL = C) without copies. Reductions
are per program in a fixed order: no atomics, the same bits run after run.

Fused multiply-add: d = (x − y)² goes through a `tl.where` before `d − mu`, so the compiler
cannot fuse the square into the subtraction (that would break d − mu <= 0 at the max).
"""
import triton
import triton.language as tl


@triton.jit
def _row_base(rows, C, sN, sC):
    n = rows // C
    c = rows - n * C
    return n.to(tl.int64) * sN + c.to(tl.int64) * sC


@triton.jit
def _tile(pid, rows_total, C, sN, sC, BLOCK_R: tl.constexpr):
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < rows_total
    return rows, row_mask, _row_base(rows, C, sN, sC)


@triton.jit
def _load_chunk(ptr, base, row_mask, start, L, sL, BLOCK_L: tl.constexpr):
    pos = start + tl.arange(0, BLOCK_L)
    mask = row_mask[:, None] & (pos < L)[None, :]
    offs = base[:, None] + pos[None, :].to(tl.int64) * sL
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32), offs, mask, pos


@triton.jit
def _sq_dist(x, y, mask):
    t = x - y
    return tl.where(mask, t * t, float("-inf"))  # masked positions never win the max


@triton.jit
def _softmax_stats(x_ptr, y_ptr, base, row_mask, L, sL, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """mu = max d and Z = Σ e^(d − mu) per row, in one sweep (online rescaling)."""
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, L, BLOCK_L):
        x, offs, mask, pos = _load_chunk(x_ptr, base, row_mask, start, L, sL, BLOCK_L)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = _sq_dist(x, y, mask)
        m_new = tl.maximum(m, tl.max(d, axis=1))
        alpha = tl.where(s == 0.0, 0.0, s * tl.exp(m - m_new))  # an empty start adds nothing
        p = tl.where(mask, tl.exp(d - m_new[:, None]), 0.0)  # NaN d gives NaN: the row is NaN
        s = alpha + tl.sum(p, axis=1)
        m = m_new
    return m, s


@triton.jit
def _attention(x, y, mask, mu, inv_z):
    return tl.where(mask, tl.exp(_sq_dist(x, y, mask) - mu[:, None]) * inv_z[:, None], 0.0)


# ------------------------------------------------------------------ MAB
@triton.jit
def mab_forward_kernel(x_ptr, y_ptr, am_ptr, mu_ptr, z_ptr, R, C, L, sN, sC, sL,
                       BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows, row_mask, base = _tile(tl.program_id(0), R, C, sN, sC, BLOCK_R)
    mu, z = _softmax_stats(x_ptr, y_ptr, base, row_mask, L, sL, BLOCK_R, BLOCK_L)
    inv_z = 1.0 / z
    for start in range(0, L, BLOCK_L):
        x, offs, mask, pos = _load_chunk(x_ptr, base, row_mask, start, L, sL, BLOCK_L)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        am = _attention(x, y, mask, mu, inv_z) * y
        tl.store(am_ptr + offs, am.to(am_ptr.dtype.element_ty), mask=mask)
    tl.store(mu_ptr + rows, mu, mask=row_mask)
    tl.store(z_ptr + rows, z, mask=row_mask)


@triton.jit
def mab_backward_kernel(dam_ptr, x_ptr, y_ptr, mu_ptr, z_ptr, dx_ptr, dy_ptr, R, C, L, sN, sC, sL,
                        BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows, row_mask, base = _tile(tl.program_id(0), R, C, sN, sC, BLOCK_R)
    mu = tl.load(mu_ptr + rows, mask=row_mask, other=0.0)
    inv_z = 1.0 / tl.load(z_ptr + rows, mask=row_mask, other=1.0)
    s = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, L, BLOCK_L):
        x, offs, mask, pos = _load_chunk(x_ptr, base, row_mask, start, L, sL, BLOCK_L)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dam_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s += tl.sum(_attention(x, y, mask, mu, inv_z) * g * y, axis=1)
    for start in range(0, L, BLOCK_L):
        x, offs, mask, pos = _load_chunk(x_ptr, base, row_mask, start, L, sL, BLOCK_L)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dam_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = _attention(x, y, mask, mu, inv_z)
        dx = 2.0 * (x - y) * a * (g * y - s[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dy_ptr + offs, (a * g - dx).to(dy_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ FAB pieces
@triton.jit
def _sum_and_first_max(mix, mask, start, total, best, k):
    """Accumulate the row sum and the first argmax over one chunk (earlier chunks win ties)."""
    total += tl.sum(tl.where(mask, mix, 0.0), axis=1)
    # NaN never wins the max (its row's v is NaN through the sum anyway).
    candidates = tl.where(mask & (mix == mix), mix, float("-inf"))
    chunk_best, chunk_k = tl.max(candidates, axis=1, return_indices=True, return_indices_tie_break_left=True)
    better = chunk_best > best
    k = tl.where(better, chunk_k.to(tl.int64) + start, k)
    best = tl.where(better, chunk_best, best)
    return total, best, k


@triton.jit
def fab_pool_kernel(am_ptr, y_ptr, v_ptr, k_ptr, R, C, L, sN, sC, sL,
                    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows, row_mask, base = _tile(tl.program_id(0), R, C, sN, sC, BLOCK_R)
    total = tl.zeros([BLOCK_R], tl.float32)
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    k = tl.zeros([BLOCK_R], tl.int64)
    for start in range(0, L, BLOCK_L):
        am, offs, mask, pos = _load_chunk(am_ptr, base, row_mask, start, L, sL, BLOCK_L)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        total, best, k = _sum_and_first_max(am + y, mask, start, total, best, k)
    tl.store(v_ptr + rows, total / L + best, mask=row_mask)
    tl.store(k_ptr + rows, k, mask=row_mask)


@triton.jit
def fab_pool_backward_kernel(dv_ptr, k_ptr, dmix_ptr, R, L, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    dv = tl.load(dv_ptr + rows, mask=row_mask, other=0.0)
    k = tl.load(k_ptr + rows, mask=row_mask, other=0)
    dv = tl.where((k >= 0) & (k < L), dv, float("nan"))  # a bad argmax: NaN, not a wild write
    for start in range(0, L, BLOCK_L):
        pos = start + tl.arange(0, BLOCK_L)
        mask = row_mask[:, None] & (pos < L)[None, :]
        grad = dv[:, None] / L + tl.where(pos[None, :] == k[:, None], dv[:, None], 0.0)
        offs = rows[:, None].to(tl.int64) * L + pos[None, :]  # dmix is NCHW-contiguous
        tl.store(dmix_ptr + offs, grad.to(dmix_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fab_blend_kernel(am_ptr, y_ptr, gate_ptr, out_ptr, R, C, L, sN, sC, sL,
                     BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows, row_mask, base = _tile(tl.program_id(0), R, C, sN, sC, BLOCK_R)
    g = tl.load(gate_ptr + rows, mask=row_mask, other=0.0)[:, None]
    for start in range(0, L, BLOCK_L):
        am, offs, mask, pos = _load_chunk(am_ptr, base, row_mask, start, L, sL, BLOCK_L)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (y + g * (am - y)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fab_blend_backward_kernel(dout_ptr, am_ptr, y_ptr, gate_ptr, dam_ptr, dy_ptr, dgate_ptr,
                              R, C, L, sN, sC, sL, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows, row_mask, base = _tile(tl.program_id(0), R, C, sN, sC, BLOCK_R)
    g = tl.load(gate_ptr + rows, mask=row_mask, other=0.0)[:, None]
    total = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, L, BLOCK_L):
        go, offs, mask, pos = _load_chunk(dout_ptr, base, row_mask, start, L, sL, BLOCK_L)
        am = tl.load(am_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(go * (am - y), axis=1)
        tl.store(dam_ptr + offs, (g * go).to(dam_ptr.dtype.element_ty), mask=mask)
        tl.store(dy_ptr + offs, ((1.0 - g) * go).to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + rows, total, mask=row_mask)


# ------------------------------------------------------------------ fused MutexAttention
@triton.jit
def stats_kernel(x_ptr, y_ptr, v_ptr, mu_ptr, z_ptr, k_ptr, R, C, L, sN, sC, sL,
                 BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """K1: mu, Z (first sweep), then mix = A·y + y: sum and first argmax (second sweep)."""
    rows, row_mask, base = _tile(tl.program_id(0), R, C, sN, sC, BLOCK_R)
    mu, z = _softmax_stats(x_ptr, y_ptr, base, row_mask, L, sL, BLOCK_R, BLOCK_L)
    inv_z = 1.0 / z
    total = tl.zeros([BLOCK_R], tl.float32)
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    k = tl.zeros([BLOCK_R], tl.int64)
    for start in range(0, L, BLOCK_L):
        x, offs, mask, pos = _load_chunk(x_ptr, base, row_mask, start, L, sL, BLOCK_L)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mix = _attention(x, y, mask, mu, inv_z) * y + y
        total, best, k = _sum_and_first_max(mix, mask, start, total, best, k)
    tl.store(v_ptr + rows, total / L + best, mask=row_mask)  # NaN reaches v through the sum
    tl.store(mu_ptr + rows, mu, mask=row_mask)
    tl.store(z_ptr + rows, z, mask=row_mask)
    tl.store(k_ptr + rows, k, mask=row_mask)


@triton.jit
def apply_kernel(x_ptr, y_ptr, gate_ptr, mu_ptr, z_ptr, out_ptr, R, C, L, sN, sC, sL,
                 BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """K2: out = y + g (A·y − y)."""
    rows, row_mask, base = _tile(tl.program_id(0), R, C, sN, sC, BLOCK_R)
    g = tl.load(gate_ptr + rows, mask=row_mask, other=0.0)[:, None]
    mu = tl.load(mu_ptr + rows, mask=row_mask, other=0.0)
    inv_z = 1.0 / tl.load(z_ptr + rows, mask=row_mask, other=1.0)
    for start in range(0, L, BLOCK_L):
        x, offs, mask, pos = _load_chunk(x_ptr, base, row_mask, start, L, sL, BLOCK_L)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = y + g * (_attention(x, y, mask, mu, inv_z) * y - y)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def backward_stats_kernel(dout_ptr, x_ptr, y_ptr, mu_ptr, z_ptr, k_ptr, stats_ptr, R, C, L, sN, sC, sL,
                          BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """K3: S1 = Σ A·dout·y, Σ dout·y, S2 = Σ A·y, A_k·y_k (columns of stats, this order)."""
    rows, row_mask, base = _tile(tl.program_id(0), R, C, sN, sC, BLOCK_R)
    mu = tl.load(mu_ptr + rows, mask=row_mask, other=0.0)
    inv_z = 1.0 / tl.load(z_ptr + rows, mask=row_mask, other=1.0)
    s1 = tl.zeros([BLOCK_R], tl.float32)
    dout_y = tl.zeros([BLOCK_R], tl.float32)
    s2 = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, L, BLOCK_L):
        x, offs, mask, pos = _load_chunk(x_ptr, base, row_mask, start, L, sL, BLOCK_L)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        go = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        am = _attention(x, y, mask, mu, inv_z) * y
        s1 += tl.sum(am * go, axis=1)
        dout_y += tl.sum(go * y, axis=1)
        s2 += tl.sum(am, axis=1)
    k = tl.load(k_ptr + rows, mask=row_mask, other=0)
    valid = (k >= 0) & (k < L)
    k_mask = row_mask & valid
    offs_k = base + tl.where(valid, k, 0) * sL
    xk = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    yk = tl.load(y_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    t = xk - yk
    am_k = tl.where(valid, tl.exp(tl.where(k_mask, t * t, 0.0) - mu) * inv_z * yk, float("nan"))
    out = stats_ptr + rows.to(tl.int64) * 4
    tl.store(out + 0, s1, mask=row_mask)
    tl.store(out + 1, dout_y, mask=row_mask)
    tl.store(out + 2, s2, mask=row_mask)
    tl.store(out + 3, am_k, mask=row_mask)


@triton.jit
def backward_apply_kernel(dout_ptr, x_ptr, y_ptr, gate_ptr, dv_ptr, mu_ptr, z_ptr, k_ptr, stats_ptr,
                          dx_ptr, dy_ptr, R, C, L, sN, sC, sL,
                          BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """K4: dx, dy from the K3 scalars and dv (SPEC §1)."""
    rows, row_mask, base = _tile(tl.program_id(0), R, C, sN, sC, BLOCK_R)
    g = tl.load(gate_ptr + rows, mask=row_mask, other=0.0)
    dv = tl.load(dv_ptr + rows, mask=row_mask, other=0.0)
    mu = tl.load(mu_ptr + rows, mask=row_mask, other=0.0)
    inv_z = 1.0 / tl.load(z_ptr + rows, mask=row_mask, other=1.0)
    k = tl.load(k_ptr + rows, mask=row_mask, other=0)
    st = stats_ptr + rows.to(tl.int64) * 4
    s1 = tl.load(st + 0, mask=row_mask, other=0.0)
    s2 = tl.load(st + 2, mask=row_mask, other=0.0)
    am_k = tl.load(st + 3, mask=row_mask, other=0.0)
    mean_grad = dv / L
    s = (g * s1 + mean_grad * s2 + dv * am_k)[:, None]
    g2, dv2, mean2 = g[:, None], dv[:, None], mean_grad[:, None]
    for start in range(0, L, BLOCK_L):
        x, offs, mask, pos = _load_chunk(x_ptr, base, row_mask, start, L, sL, BLOCK_L)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        go = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = _attention(x, y, mask, mu, inv_z)
        pool_grad = mean2 + tl.where(pos[None, :] == k[:, None], dv2, 0.0)
        dam = g2 * go + pool_grad
        dx = 2.0 * (x - y) * a * (dam * y - s)
        dy = a * dam - dx + (1.0 - g2) * go + pool_grad
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)
