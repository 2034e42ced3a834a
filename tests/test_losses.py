"""AdaptiveMutexLoss (paper eq. 12–16) against hand-computed values."""
import math

import pytest
import torch

from mutex_attn.losses import AdaptiveMutexLoss
from mutex_attn.models import MutexOutput


def _output(cos_value=0.25):
    """Logits with CE = ln 2 on each path and features with cosine `cos_value` per sample."""
    logits = torch.zeros(2, 2, requires_grad=True)
    logits_mutex = torch.zeros(2, 2, requires_grad=True)
    a = torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)
    b = torch.tensor([cos_value, math.sqrt(1 - cos_value**2), 0.0, 0.0]).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)
    return MutexOutput(logits, logits_mutex, a.requires_grad_(), b.requires_grad_())


Y, YM = torch.tensor([0, 1]), torch.tensor([1, 0])


def test_ce_mode():
    parts = AdaptiveMutexLoss("ce")(_output(), Y, YM, return_parts=True)
    assert parts.ce.item() == pytest.approx(2 * math.log(2))
    assert parts.cs.item() == pytest.approx(0.25)
    assert parts.loss.item() == pytest.approx(2 * math.log(2))
    assert (parts.weight_ce.item(), parts.weight_cs.item()) == (1.0, 0.0)


def test_equal_mode():
    loss = AdaptiveMutexLoss("equal")(_output(), Y, YM)
    assert loss.item() == pytest.approx(2 * math.log(2) + 0.25)


def test_adaptive_mode_by_hand():
    ce, cs = 2 * math.log(2), 0.25
    a1 = math.exp(1 / ce) / (math.exp(1 / ce) + math.exp(1 / cs))
    a2 = 1 - a1
    out = _output()
    parts = AdaptiveMutexLoss("adaptive")(out, Y, YM, return_parts=True)
    assert parts.weight_ce.item() == pytest.approx(a1, rel=1e-6)
    assert parts.weight_cs.item() == pytest.approx(a2, rel=1e-6)
    assert parts.loss.item() == pytest.approx(a1 * ce + a2 * cs, rel=1e-6)
    # The weights are constants for backpropagation: d loss / d logits = a1 * d CE / d logits.
    parts.loss.backward()
    expected = a1 * (torch.softmax(torch.zeros(2, 2), 1) - torch.eye(2)[Y]) / 2
    torch.testing.assert_close(out.logits.grad, expected)
    assert not parts.weight_ce.requires_grad


def test_tiny_losses_stay_finite():
    out = _output(cos_value=0.0)  # L_CS = 0 exactly
    big = torch.tensor([[30.0, -30.0], [-30.0, 30.0]], requires_grad=True)  # CE ~ 1e-26
    out = out._replace(logits=big, logits_mutex=big.flip(0))
    parts = AdaptiveMutexLoss("adaptive")(out, Y, torch.tensor([0, 1]), return_parts=True)
    assert torch.isfinite(parts.loss) and torch.isfinite(parts.weight_ce) and torch.isfinite(parts.weight_cs)
    parts.loss.backward()
    assert torch.isfinite(big.grad).all() and torch.isfinite(out.features.grad).all()


def test_bad_mode():
    with pytest.raises(ValueError, match="unknown loss mode"):
        AdaptiveMutexLoss("focal")
