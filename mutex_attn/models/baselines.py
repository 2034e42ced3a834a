"""The paper's attention baselines from timm: SE-ResNet-50 and CBAM-ResNet-50 (the plain
ResNet-50 and DenseNet-169 live beside MA-Net in torchvision_backbones). Pretrained weights,
as for MA-Net, come only from a local file."""
from __future__ import annotations

import torch
from torch import nn

from mutex_attn.models.torchvision_backbones import load_backbone_weights


def _timm_model(name: str, num_classes: int, pretrained, **kwargs) -> nn.Module:
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a dependency of the app
        raise ImportError(f"the {name} baseline needs timm: pip install timm") from e
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if pretrained:
        if pretrained is True:
            raise ValueError(
                "timm baselines load pretrained weights only from a local file: pass "
                "pretrained='/path/to/weights.pth' (mutex_attn never downloads)"
            )
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        load_backbone_weights(model, state, "fc.")
    return model


def seresnet50(num_classes: int = 2, pretrained=False) -> nn.Module:
    return _timm_model("seresnet50", num_classes, pretrained)


def cbam_resnet50(num_classes: int = 2, pretrained=False) -> nn.Module:
    return _timm_model("resnet50", num_classes, pretrained, block_args=dict(attn_layer="cbam"))
