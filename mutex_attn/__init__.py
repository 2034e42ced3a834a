"""mutex_attn: the mutex attention (MAB) and fusion attention (FAB) blocks of MA-Net
(Zheng et al., 2022) as fused operators, and the MA-Net model, loss and data pairing.

    import mutex_attn as ma
    am  = ma.mab(x, y)                       # softmax_HW((x - y)^2) * y
    blk = ma.MutexAttention(channels=256)    # FAB(MAB(x, y), y), the drop-in unit
"""
from mutex_attn import losses, models
from mutex_attn.backends import BACKEND_NAMES, available_backends
from mutex_attn.modules import (
    FusionAttentionBlock,
    GateNetwork,
    MutexAttention,
    MutexAttentionBlock,
    mab,
)

__version__ = "0.1.0"

# Load the C++ ops now (torch.ops.mutex_attn.*), so that they exist as soon as the package is
# imported; a missing build is remembered as the reason the "native" backend is unavailable.
from mutex_attn.backends import preload as _preload

_preload()

__all__ = [
    "BACKEND_NAMES",
    "FusionAttentionBlock",
    "GateNetwork",
    "MutexAttention",
    "MutexAttentionBlock",
    "available_backends",
    "losses",
    "mab",
    "models",
]
