"""MA-Net models: the generic dual-path MutexNet and its torchvision backbones."""
from mutex_attn.models.mutex_net import GlobalAvgPool, MutexNet, MutexOutput, infer_stage_channels
from mutex_attn.models.torchvision_backbones import manet_densenet169, manet_resnet50

__all__ = [
    "GlobalAvgPool",
    "MutexNet",
    "MutexOutput",
    "infer_stage_channels",
    "manet_densenet169",
    "manet_resnet50",
]
