"""The "reference" backend: the plain-PyTorch oracle in `mutex_attn.reference`, on any device."""
from __future__ import annotations

import torch

from mutex_attn.reference import fab, mab, mutex_attention

__all__ = ["fab", "mab", "mutex_attention", "unavailable_reason"]


def unavailable_reason(device: torch.device) -> str | None:
    return None
