"""The public operators and nn.Modules: MAB, FAB and their composition MutexAttention.

Each checks its inputs (SPEC §4), handles empty inputs, then hands the work to the backend
chosen for the inputs' device (`backend="auto"` picks the fastest available one).
"""
from __future__ import annotations

import torch
from torch import nn

from mutex_attn import _validation as check
from mutex_attn.backends import check_backend_name, resolve
from mutex_attn.backends.kernel_backend import is_channels_last


def mab(x: torch.Tensor, y: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Mutex attention block: am = softmax over H·W of (x − y)², times y (paper eq. 3–5).

    x, y: [N, C, H, W] floating point, same shape, dtype and device. Returns am, like y.
    """
    check.check_pair(x, y, ("x", "y"))
    check_backend_name(backend)
    if x.numel() == 0:
        return x * y  # empty, but still connected to both inputs for autograd
    return resolve(backend, x.device, "mab", is_channels_last(x)).mab(x, y)


class GateNetwork(nn.Module):
    """The FAB gate G (paper eq. 8–10): v [N, C] → gate [N, C] in (0, 1).

    Linear(C, C) → BN → ReLU → Linear(C, C') → BN → ReLU → Z; gate = softmax(M, N)[0]
    = sigmoid(M − N) with M = Linear(C', C)(Z), N = Linear(C', C)(Z); C' = max(C // reduction, 32).
    The first two Linear layers have no bias because BatchNorm follows them.
    """

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 32):
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1; got {channels}, {reduction}")
        self.channels = channels
        self.hidden = max(channels // reduction, min_hidden)
        self.fc1 = nn.Linear(channels, channels, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.fc2 = nn.Linear(channels, self.hidden, bias=False)
        self.bn2 = nn.BatchNorm1d(self.hidden)
        self.fc_m = nn.Linear(self.hidden, channels)
        self.fc_n = nn.Linear(self.hidden, channels)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        weight_dtype = self.fc1.weight.dtype
        check.check_gate_precision(v.dtype, weight_dtype)
        v = v.to(weight_dtype)  # e.g. float32 pooled stats into a half-precision module
        z = torch.relu(self.bn1(self.fc1(v)))
        z = torch.relu(self.bn2(self.fc2(z)))
        return torch.sigmoid(self.fc_m(z) - self.fc_n(z))


def _check_fab_inputs(a: torch.Tensor, y: torch.Tensor, names, channels: int) -> None:
    check.check_pair(a, y, names)
    check.check_channels(a, channels, names[0])
    check.check_spatial(a, names[0])


class MutexAttentionBlock(nn.Module):
    """MAB as a module (it has no parameters): forward(x, y) -> am."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend_name(backend)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mab(x, y, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class FusionAttentionBlock(nn.Module):
    """FAB (paper eq. 6–11): forward(am, y) -> gate · am + (1 − gate) · y, gate = G(mean + max)."""

    def __init__(self, channels: int, reduction: int = 16, backend: str = "auto"):
        super().__init__()
        self.channels = channels
        self.backend = check_backend_name(backend)
        self.gate = GateNetwork(channels, reduction)

    def forward(self, am: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_fab_inputs(am, y, ("am", "y"), self.channels)
        if am.shape[0] == 0:
            return am * y
        return resolve(self.backend, am.device, "fab", is_channels_last(am)).fab(am, y, self.gate)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, backend={self.backend!r}"


class MutexAttention(nn.Module):
    """The drop-in unit FAB(MAB(x, y), y) (paper eq. 2).

    x is the main path's feature map (F_rei), y the mutex path's (F_rem); returns F_om.
    All parameters live in `.fab` (its gate network). Backends with a fused kernel compute the
    whole unit without storing the intermediate attention maps.
    """

    def __init__(self, channels: int, reduction: int = 16, backend: str = "auto"):
        super().__init__()
        self.channels = channels
        self.backend = check_backend_name(backend)
        self.fab = FusionAttentionBlock(channels, reduction, backend)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_fab_inputs(x, y, ("x", "y"), self.channels)
        if x.shape[0] == 0:
            return x * y
        return resolve(self.backend, x.device, "mutex_attention", is_channels_last(x)).mutex_attention(x, y, self.fab.gate)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, backend={self.backend!r}"
