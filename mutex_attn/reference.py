"""The reference backend: MAB and FAB in plain PyTorch, written the way a user would write them.

It is the oracle every kernel is tested against and the baseline every benchmark compares with,
so it stays deliberately simple: autograd does the backward, and nothing is fused.

Precision: float16/bfloat16 inputs are computed in float32 and the result is cast back;
float64 stays float64 (SPEC §1 "Numerics").
"""
from __future__ import annotations

from typing import Callable

import torch

from mutex_attn._validation import check_gate

GateFn = Callable[[torch.Tensor], torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything narrower is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mab_attention(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A = softmax over the H·W positions of (x − y)², per sample and per channel."""
    d = (x - y).square()
    return torch.softmax(d.flatten(2), dim=-1).reshape(x.shape)


def fab_pool(am: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """v = mean(mix) + max(mix) over H·W, mix = am + y; shape [N, C].

    The max is taken with argmax + gather so that its gradient goes to the first position
    attaining the max (argmax returns the lowest index), as SPEC §1 fixes.
    """
    mix = (am + y).flatten(2)
    first_max = mix.argmax(dim=-1, keepdim=True)
    return mix.mean(dim=-1) + mix.gather(-1, first_max).squeeze(-1)


def fab_blend(am: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """out = gate · am + (1 − gate) · y, gate one weight per (sample, channel)."""
    g = gate[:, :, None, None]
    return g * am + (1 - g) * y


def _fab_compute(am: torch.Tensor, y: torch.Tensor, gate_fn: GateFn) -> torch.Tensor:
    gate = gate_fn(fab_pool(am, y))
    check_gate(gate, am)  # a custom gate network must give one weight per (sample, channel)
    return fab_blend(am, y, gate.to(am.dtype))


def mab(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mutex attention block, paper eq. 3–5: am = softmax_HW((x − y)²) · y."""
    cd = compute_dtype(x.dtype)
    xc, yc = x.to(cd), y.to(cd)
    return (mab_attention(xc, yc) * yc).to(x.dtype)


def fab(am: torch.Tensor, y: torch.Tensor, gate_fn: GateFn) -> torch.Tensor:
    """Fusion attention block, paper eq. 6–11, with the gate network `gate_fn`: [N, C] → [N, C]."""
    cd = compute_dtype(am.dtype)
    return _fab_compute(am.to(cd), y.to(cd), gate_fn).to(am.dtype)


def mutex_attention(x: torch.Tensor, y: torch.Tensor, gate_fn: GateFn) -> torch.Tensor:
    """FAB(MAB(x, y), y), paper eq. 2. `am` stays in the compute dtype between the two blocks."""
    cd = compute_dtype(x.dtype)
    xc, yc = x.to(cd), y.to(cd)
    am = mab_attention(xc, yc) * yc
    return _fab_compute(am, yc, gate_fn).to(x.dtype)
