"""Input checks shared by every backend (SPEC §4).

Errors name the argument and the shapes involved, and nothing is ever broadcast silently:
a kernel that receives a tensor has already passed these checks.
"""
from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_feature_map(t, name: str) -> None:
    """A feature map is a floating-point tensor of shape [N, C, H, W]."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64); "
            f"got {_describe(t)}"
        )
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor [N, C, H, W]; got {_describe(t)}")


def check_pair(a, b, names: tuple[str, str] = ("x", "y")) -> None:
    """Two feature maps of exactly the same shape, dtype and device."""
    check_feature_map(a, names[0])
    check_feature_map(b, names[1])
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape (no broadcasting); "
            f"got {names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(
            f"{names[0]} and {names[1]} must be on the same device; "
            f"got {names[0]} on {a.device} and {names[1]} on {b.device}"
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"{names[0]} and {names[1]} must have the same dtype; "
            f"got {names[0]} {a.dtype} and {names[1]} {b.dtype}"
        )


def check_channels(t: torch.Tensor, channels: int, name: str) -> None:
    if t.shape[1] != channels:
        raise ValueError(
            f"{name} has {t.shape[1]} channels but this block was built for {channels}; "
            f"got {name} of shape {tuple(t.shape)}"
        )


def check_spatial(t: torch.Tensor, name: str) -> None:
    """FAB pools over H·W, which needs at least one position."""
    if t.shape[2] * t.shape[3] == 0 and t.shape[0] * t.shape[1] != 0:
        raise ValueError(
            f"{name} has no spatial positions (H·W = 0); pooling needs at least one; "
            f"got shape {tuple(t.shape)}"
        )


def check_gate(gate, like: torch.Tensor, name: str = "gate") -> None:
    """A gate is one weight per (sample, channel): shape [N, C], on the feature map's device."""
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(gate).__name__}")
    if not gate.is_floating_point():
        raise TypeError(f"{name} must be floating point; got {_describe(gate)}")
    expected = tuple(like.shape[:2])
    if tuple(gate.shape) != expected:
        raise ValueError(
            f"{name} must have shape [N, C] = {list(expected)} for feature maps of shape "
            f"{tuple(like.shape)}; got {name} of shape {tuple(gate.shape)}"
        )
    if gate.device != like.device:
        raise ValueError(
            f"{name} must be on the feature maps' device {like.device}; got {gate.device}"
        )


def check_gate_precision(features_dtype: torch.dtype, weight_dtype: torch.dtype) -> None:
    """float64 features must meet a float64 gate network: no silent downcast (SPEC §4)."""
    if features_dtype == torch.float64 and weight_dtype != torch.float64:
        raise TypeError(
            f"the features are float64 but the gate network's parameters are {weight_dtype}; "
            "call .double() on the module to keep float64 precision"
        )
