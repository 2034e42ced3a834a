"""MA-Net on torchvision's ResNet-50 and DenseNet-169: split into stages, export back.

Pretrained ImageNet weights are read from the local torch hub cache (or a path you give);
nothing is ever downloaded, so imports and tests stay offline.
"""
from __future__ import annotations

import copy
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn

from mutex_attn.models.mutex_net import MutexNet


def _local_weights(weights_enum, pretrained) -> dict:
    """The state dict for `pretrained` (True: the hub cache file of `weights_enum`; or a path)."""
    if pretrained is True:
        filename = weights_enum.url.rsplit("/", 1)[-1]
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    else:
        path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights not found at {path}. mutex_attn never downloads: fetch "
            f"{weights_enum.url} yourself and put it there, or pass pretrained='/path/to/file.pth'"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def load_backbone_weights(model: nn.Module, state: dict, head_prefix: str) -> None:
    """Load ImageNet weights; the head is kept fresh when its shape differs (e.g. 2 classes)."""
    own = model.state_dict()
    state = {
        k: v for k, v in state.items()
        if not (k.startswith(head_prefix) and own.get(k, v).shape != v.shape)
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = [k for k in missing if not k.startswith(head_prefix)] + list(unexpected)
    if wrong:
        raise RuntimeError(f"pretrained weights do not fit the backbone: {wrong[:5]}")


def _on_meta(builder, **kwargs) -> nn.Module:
    """A torchvision skeleton without allocating or initialising weights."""
    with torch.device("meta"):
        return builder(weights=None, **kwargs)


def _check_no_meta(model: nn.Module) -> nn.Module:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise AssertionError(f"export left placeholder tensors in {left[:3]}")
    return model


# --- ResNet-50 -------------------------------------------------------------------------------

def resnet50(num_classes: int = 2, pretrained=False) -> torchvision.models.ResNet:
    """torchvision's ResNet-50 (the plain baseline, and MA-Net's backbone)."""
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    if pretrained:
        state = _local_weights(torchvision.models.ResNet50_Weights.IMAGENET1K_V1, pretrained)
        load_backbone_weights(model, state, "fc.")
    return model


def _resnet_stages(model: torchvision.models.ResNet) -> list[nn.Module]:
    stem = nn.Sequential(OrderedDict(
        conv1=model.conv1, bn1=model.bn1, relu=model.relu, maxpool=model.maxpool
    ))
    return [stem, model.layer1, model.layer2, model.layer3, model.layer4]


def _export_resnet50(net: MutexNet) -> nn.Module:
    model = _on_meta(torchvision.models.resnet50, num_classes=net.head.out_features)
    stem, model.layer1, model.layer2, model.layer3, model.layer4 = copy.deepcopy(list(net.stages))
    model.conv1, model.bn1, model.relu, model.maxpool = stem.conv1, stem.bn1, stem.relu, stem.maxpool
    model.fc = copy.deepcopy(net.head)
    return _check_no_meta(model)


def manet_resnet50(
    num_classes: int = 2, pretrained=False, backend: str = "auto", reduction: int = 16,
    blocks: str = "mab+fab",
) -> MutexNet:
    """MA-Net with a ResNet-50 backbone: MutexAttention after the stem and after layer1..4."""
    model = resnet50(num_classes, pretrained)
    return MutexNet(
        _resnet_stages(model), model.fc, channels=[64, 256, 512, 1024, 2048],
        reduction=reduction, backend=backend, exporter=_export_resnet50, blocks=blocks,
    )


# --- DenseNet-169 ----------------------------------------------------------------------------

# Old torchvision checkpoints name DenseNet layers "norm.1"; today's modules say "norm1".
_OLD_DENSE_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def densenet169(num_classes: int = 2, pretrained=False) -> torchvision.models.DenseNet:
    """torchvision's DenseNet-169 (the plain baseline, and MA-Net's backbone)."""
    model = torchvision.models.densenet169(weights=None, num_classes=num_classes)
    if pretrained:
        state = _local_weights(torchvision.models.DenseNet169_Weights.IMAGENET1K_V1, pretrained)
        state = {_OLD_DENSE_KEY.sub(r"\1\2", k): v for k, v in state.items()}
        load_backbone_weights(model, state, "classifier.")
    return model


def _densenet_stages(model: torchvision.models.DenseNet) -> list[nn.Module]:
    f = model.features
    stem = nn.Sequential(OrderedDict(conv0=f.conv0, norm0=f.norm0, relu0=f.relu0, pool0=f.pool0))
    stages = [stem]
    for i in (1, 2, 3):
        stages.append(nn.Sequential(OrderedDict({
            f"denseblock{i}": getattr(f, f"denseblock{i}"),
            f"transition{i}": getattr(f, f"transition{i}"),
        })))
    # torchvision applies this last ReLU functionally in DenseNet.forward.
    stages.append(nn.Sequential(OrderedDict(denseblock4=f.denseblock4, norm5=f.norm5, relu5=nn.ReLU())))
    return stages


def _export_densenet169(net: MutexNet) -> nn.Module:
    model = _on_meta(torchvision.models.densenet169, num_classes=net.head.out_features)
    layers = OrderedDict(
        (name, module)
        for stage in copy.deepcopy(list(net.stages))
        for name, module in stage.named_children()
        if name != "relu5"
    )
    model.features = nn.Sequential(layers)
    model.classifier = copy.deepcopy(net.head)
    return _check_no_meta(model)


def manet_densenet169(
    num_classes: int = 2, pretrained=False, backend: str = "auto", reduction: int = 16,
    blocks: str = "mab+fab",
) -> MutexNet:
    """MA-Net with a DenseNet-169 backbone: MutexAttention after the stem and each dense block."""
    model = densenet169(num_classes, pretrained)
    return MutexNet(
        _densenet_stages(model), model.classifier, channels=[64, 128, 256, 640, 1664],
        reduction=reduction, backend=backend, exporter=_export_densenet169, blocks=blocks,
    )
