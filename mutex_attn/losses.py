"""The MA-Net loss (paper eq. 12–16): cross-entropy on both paths plus the cosine similarity
of the two paths' last feature maps, weighted adaptively.

    L_CE = CE(logits, y) + CE(logits_mutex, y_mutex)
    L_CS = mean over the batch of cos(flatten(features), flatten(features_mutex))
    a1, a2 = softmax(1 / L_CE, 1 / L_CS)          (detached; losses clamped away from 0)
    L = a1 · L_CE + a2 · L_CS

Modes for the paper's ablations: "ce" (L_CE only), "equal" (L_CE + L_CS), "adaptive".
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("ce", "equal", "adaptive")


class MutexLossParts(NamedTuple):
    loss: torch.Tensor  # what to backpropagate
    ce: torch.Tensor  # L_CE (both paths)
    cs: torch.Tensor  # L_CS
    weight_ce: torch.Tensor  # a1 (detached)
    weight_cs: torch.Tensor  # a2 (detached)


def adaptive_weights(ce: torch.Tensor, cs: torch.Tensor, eps: float) -> torch.Tensor:
    """[a1, a2] = softmax(1/L_CE, 1/L_CS), detached; softmax subtracts the max, so no overflow."""
    parts = torch.stack([ce.detach().float(), cs.detach().float()]).clamp_min(eps)
    return torch.softmax(parts.reciprocal(), dim=0)


class AdaptiveMutexLoss(nn.Module):
    """forward(output: MutexOutput, target, target_mutex, return_parts=False)."""

    def __init__(self, mode: str = "adaptive", eps: float = 1e-6):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown loss mode {mode!r}; choose one of {MODES}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0; got {eps}")
        self.mode = mode
        self.eps = eps

    def forward(self, output, target: torch.Tensor, target_mutex: torch.Tensor, return_parts=False):
        ce = F.cross_entropy(output.logits.float(), target) + F.cross_entropy(
            output.logits_mutex.float(), target_mutex
        )
        cs = F.cosine_similarity(
            output.features.flatten(1).float(), output.features_mutex.flatten(1).float(), dim=1
        ).mean()
        if self.mode == "ce":
            weights = ce.new_tensor([1.0, 0.0])
            loss = ce
        elif self.mode == "equal":
            weights = ce.new_tensor([1.0, 1.0])
            loss = ce + cs
        else:
            weights = adaptive_weights(ce, cs, self.eps)
            loss = weights[0] * ce + weights[1] * cs
        if return_parts:
            return MutexLossParts(loss, ce, cs, weights[0], weights[1])
        return loss

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
