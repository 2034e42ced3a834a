"""Bad input (SPEC §4): clear errors naming the argument and the shapes, never a broadcast."""
import pytest
import torch
from torch import nn

import mutex_attn as ma
from conftest import CPU_BACKENDS

OK = (2, 3, 4, 4)


def _calls(backend):
    block = ma.MutexAttention(3, backend=backend)
    fab = ma.FusionAttentionBlock(3, backend=backend)
    return {
        "mab": lambda a, b: ma.mab(a, b, backend=backend),
        "MutexAttentionBlock": ma.MutexAttentionBlock(backend),
        "FusionAttentionBlock": fab,
        "MutexAttention": block,
    }


BAD = [
    # (x, y, error, words the message must contain)
    (lambda: torch.randn(3, 4, 4), lambda: torch.randn(3, 4, 4), ValueError, ["4-D", "(3, 4, 4)"]),
    (lambda: torch.randn(OK), lambda: torch.randn(1, 3, 4, 4), ValueError, ["same shape", "(1, 3, 4, 4)"]),
    (lambda: torch.randn(OK), lambda: torch.randn(2, 3, 1, 4), ValueError, ["broadcast", "(2, 3, 1, 4)"]),
    (lambda: torch.randn(OK), lambda: torch.randn(OK, dtype=torch.float64), TypeError, ["dtype", "float64"]),
    (lambda: torch.randn(OK), lambda: torch.randn(OK, device="meta"), ValueError, ["device", "meta"]),
    (lambda: torch.ones(OK, dtype=torch.int64), lambda: torch.ones(OK, dtype=torch.int64), TypeError, ["floating", "int64"]),
    (lambda: torch.ones(OK, dtype=torch.bool), lambda: torch.ones(OK), TypeError, ["floating", "bool"]),
    (lambda: [[1.0]], lambda: torch.randn(OK), TypeError, ["torch.Tensor", "list"]),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", range(len(BAD)))
@pytest.mark.parametrize("op", ["mab", "MutexAttentionBlock", "FusionAttentionBlock", "MutexAttention"])
def test_bad_pairs(backend, case, op):
    make_x, make_y, error, words = BAD[case]
    with pytest.raises(error) as info:
        _calls(backend)[op](make_x(), make_y())
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("op", ["FusionAttentionBlock", "MutexAttention"])
def test_wrong_channel_count(op):
    with pytest.raises(ValueError, match=r"has 5 channels but this block was built for 3"):
        _calls("auto")[op](torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4))


@pytest.mark.parametrize("op", ["FusionAttentionBlock", "MutexAttention"])
def test_no_spatial_positions(op):
    with pytest.raises(ValueError, match=r"H·W = 0"):
        _calls("auto")[op](torch.randn(2, 3, 0, 4), torch.randn(2, 3, 0, 4))


class _BroadcastingGate(nn.Module):
    def forward(self, v):
        return torch.sigmoid(v.mean(dim=1, keepdim=True))  # [N, 1]: would broadcast silently


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["FusionAttentionBlock", "MutexAttention"])
def test_gate_of_wrong_shape(backend, op):
    block = _calls(backend)[op]
    fab = block if op == "FusionAttentionBlock" else block.fab
    fab.gate = _BroadcastingGate()
    with pytest.raises(ValueError, match=r"gate must have shape \[N, C\] = \[2, 3\].*\(2, 1\)"):
        block(torch.randn(OK), torch.randn(OK))


def test_float64_features_need_a_float64_gate():
    with pytest.raises(TypeError, match=r"\.double\(\)"):
        ma.MutexAttention(3)(torch.randn(OK, dtype=torch.float64), torch.randn(OK, dtype=torch.float64))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        ma.MutexAttention(3, backend="cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        ma.mab(torch.randn(OK), torch.randn(OK), backend="cudnn")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="channels and reduction"):
        ma.MutexAttention(0)
