"""MutexNet: any staged backbone run twice with shared weights, plus MutexAttention per stage.

    f = x;  g = x_mutex
    for each stage k:
        f_next = stage_k(f)                    # the main path is the plain backbone
        g = MutexAttention_k(f_next, stage_k(g))
        f = f_next
    logits = head(pool(f)),  logits_mutex = head(pool(g))          (SPEC §2, paper Fig. 3)

The two paths go through the stages in separate calls, so BatchNorm's batch statistics of the
main path never see the mutex images: the main path is exactly the plain backbone. Only the
main path updates the stages' BatchNorm running statistics: inference runs the main path
alone, and the mutex path's features (scaled and shifted by the attention) would otherwise
pull the running mean and variance away from it (a demo run validated at 0.5 accuracy with
0.8 AUC before this: right ranking, wrong offset).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from mutex_attn.modules import MutexAttention, MutexAttentionBlock

# Which attention the mutex path gets after each stage (the paper's Table 8 ablation).
BLOCKS = ("mab+fab", "mab", "none")


class MutexOutput(NamedTuple):
    logits: torch.Tensor
    logits_mutex: torch.Tensor
    features: torch.Tensor  # last stage output of the main path, [N, C, H, W]
    features_mutex: torch.Tensor  # the same for the mutex path


@contextlib.contextmanager
def batch_stats_only(module: nn.Module):
    """BatchNorm layers inside `module` normalise with the batch, as in training, but leave
    their running statistics (and batch counters) alone."""
    layers = [m for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


class MutexPassThrough(nn.Module):
    """The "none" ablation: the mutex path is the plain backbone on the mutex image."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y


def _attention_unit(blocks: str, channels: int, reduction: int, backend: str) -> nn.Module:
    if blocks == "mab+fab":
        return MutexAttention(channels, reduction=reduction, backend=backend)
    if blocks == "mab":
        return MutexAttentionBlock(backend)
    return MutexPassThrough()


class GlobalAvgPool(nn.Module):
    """[N, C, H, W] → [N, C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


@torch.no_grad()
def infer_stage_channels(
    stages: Sequence[nn.Module], in_channels: int = 3, size: int = 64
) -> list[int]:
    """Channels after each stage, found with one small dry run (train/eval state kept as is)."""
    modes = [m.training for m in stages]
    probe = next((p for s in stages for p in s.parameters()), None)
    t = torch.zeros(1, in_channels, size, size)
    if probe is not None:
        t = t.to(probe.device, probe.dtype)
    channels = []
    try:
        for stage in stages:
            stage.eval()  # no BatchNorm statistics are touched by the probe
            t = stage(t)
            channels.append(t.shape[1])
    finally:
        for stage, mode in zip(stages, modes):
            stage.train(mode)
    return channels


class MutexNet(nn.Module):
    """A dual-path network over `stages` with one shared `head` (SPEC §2).

    forward(x) -> logits: the plain backbone.
    forward(x, x_mutex) -> MutexOutput(logits, logits_mutex, features, features_mutex).

    `blocks` picks the attention of the mutex path: "mab+fab" (MA-Net), "mab" or "none" (the
    paper's ablations). `channels` (one per stage) is inferred by a dry run when not given. `exporter`, given by the
    torchvision factories, rebuilds the original torchvision model from this one's modules.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        head: nn.Module,
        channels: Sequence[int] | None = None,
        *,
        pool: nn.Module | None = None,
        reduction: int = 16,
        backend: str = "auto",
        in_channels: int = 3,
        exporter: Callable[["MutexNet"], nn.Module] | None = None,
        blocks: str = "mab+fab",
    ):
        super().__init__()
        if blocks not in BLOCKS:
            raise ValueError(f"unknown blocks {blocks!r}; choose one of {BLOCKS}")
        if len(stages) == 0:
            raise ValueError("MutexNet needs at least one stage")
        self.stages = nn.ModuleList(stages)
        if channels is None:
            channels = infer_stage_channels(self.stages, in_channels)
        if len(channels) != len(stages):
            raise ValueError(f"got {len(channels)} channel counts for {len(stages)} stages")
        self.blocks = blocks
        self.attention = nn.ModuleList(
            _attention_unit(blocks, c, reduction, backend) for c in channels
        )
        self.pool = pool if pool is not None else GlobalAvgPool()
        self.head = head
        self._exporter = exporter

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor, x_mutex: torch.Tensor | None = None):
        if x_mutex is None:
            return self.head(self.pool(self.forward_features(x)))
        if x_mutex.shape != x.shape:
            raise ValueError(
                f"x and x_mutex must have the same shape; got x {tuple(x.shape)} and "
                f"x_mutex {tuple(x_mutex.shape)}"
            )
        f, g = x, x_mutex
        for stage, attention in zip(self.stages, self.attention):
            f = stage(f)
            with batch_stats_only(stage) if self.training else contextlib.nullcontext():
                g_stage = stage(g)
            g = attention(f, g_stage)
        return MutexOutput(self.head(self.pool(f)), self.head(self.pool(g)), f, g)

    def export_backbone(self) -> nn.Module:
        """A standalone copy of the plain backbone (no mutex path) with the trained weights.

        For the torchvision factories it is the torchvision model itself (e.g. a ResNet);
        otherwise an nn.Sequential(stages..., pool, head). In eval mode its output equals
        forward(x) exactly.
        """
        if self._exporter is not None:
            return self._exporter(self)
        return nn.Sequential(
            *copy.deepcopy(list(self.stages)), copy.deepcopy(self.pool), copy.deepcopy(self.head)
        )
