"""SPEC §1 written out formula by formula, in float64, without autograd.

This is independent of every backend (the reference included): forward and the hand-derived
backward formulas of the SPEC. Tests compare each backend's outputs and autograd gradients
with it.
"""
from __future__ import annotations

import torch


def rows(t: torch.Tensor) -> torch.Tensor:
    return t.double().reshape(t.shape[0], t.shape[1], -1)


def attention(x, y):
    d = (rows(x) - rows(y)) ** 2
    e = torch.exp(d - d.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def mab_forward(x, y):
    return (attention(x, y) * rows(y)).reshape(x.shape)


def mab_backward(dam, x, y):
    a, dam, xr, yr = attention(x, y), rows(dam), rows(x), rows(y)
    s = (a * dam * yr).sum(dim=-1, keepdim=True)
    dd = a * (dam * yr - s)
    dx = 2 * (xr - yr) * dd
    dy = a * dam - dx
    return dx.reshape(x.shape), dy.reshape(x.shape)


def first_max_index(mix_rows):
    """The lowest index attaining the row max, by an explicit scan (not argmax)."""
    n, c, length = mix_rows.shape
    k = torch.empty(n, c, dtype=torch.long)
    for i in range(n):
        for j in range(c):
            row = mix_rows[i, j].tolist()
            best = max(row)
            k[i, j] = row.index(best)
    return k


def fab_pool(am, y):
    mix = rows(am) + rows(y)
    return mix.mean(dim=-1) + mix.max(dim=-1).values


def fab_forward(am, y, gate):
    g = gate.double()[:, :, None]
    return (g * rows(am) + (1 - g) * rows(y)).reshape(am.shape)


def fab_backward(dout, am, y, gate, dv):
    """dam, dy and dgate of FAB, given dv = ∂loss/∂v from the gate network's backward."""
    dout_r, am_r, y_r = rows(dout), rows(am), rows(y)
    g, dv = gate.double()[:, :, None], dv.double()[:, :, None]
    length = dout_r.shape[-1]
    dgate = (dout_r * (am_r - y_r)).sum(dim=-1)
    k = first_max_index(am_r + y_r)
    onehot = torch.zeros_like(dout_r).scatter_(-1, k[:, :, None], 1.0)
    pool_grad = dv / length + dv * onehot
    dam = g * dout_r + pool_grad
    dy = (1 - g) * dout_r + pool_grad
    return dam.reshape(am.shape), dy.reshape(am.shape), dgate
