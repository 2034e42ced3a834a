"""MA-Net models: the generic dual-path MutexNet, its torchvision backbones, the baselines, and
`create_model(name)` for the command-line tools."""
from __future__ import annotations

from torch import nn

from mutex_attn.models.baselines import cbam_resnet50, seresnet50
from mutex_attn.models.mutex_net import (
    BLOCKS,
    GlobalAvgPool,
    MutexNet,
    MutexOutput,
    infer_stage_channels,
)
from mutex_attn.models.torchvision_backbones import (
    densenet169,
    manet_densenet169,
    manet_resnet50,
    resnet50,
)

MUTEX_MODELS = {"manet_resnet50": manet_resnet50, "manet_densenet169": manet_densenet169}
BASELINES = {
    "resnet50": resnet50, "densenet169": densenet169,
    "seresnet50": seresnet50, "cbam_resnet50": cbam_resnet50,
}
MODEL_NAMES = tuple(MUTEX_MODELS) + tuple(BASELINES)


def create_model(
    name: str, num_classes: int = 2, pretrained=False, *, backend: str = "auto",
    blocks: str = "mab+fab",
) -> nn.Module:
    """A model by name: an MA-Net (a MutexNet, trained on mutex pairs) or a baseline.

    `backend` and `blocks` apply to MA-Net only; baselines ignore them.
    """
    if name in MUTEX_MODELS:
        return MUTEX_MODELS[name](num_classes, pretrained, backend=backend, blocks=blocks)
    if name in BASELINES:
        return BASELINES[name](num_classes, pretrained)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


__all__ = [
    "BASELINES",
    "BLOCKS",
    "GlobalAvgPool",
    "MODEL_NAMES",
    "MUTEX_MODELS",
    "MutexNet",
    "MutexOutput",
    "cbam_resnet50",
    "create_model",
    "densenet169",
    "infer_stage_channels",
    "manet_densenet169",
    "manet_resnet50",
    "resnet50",
    "seresnet50",
]
