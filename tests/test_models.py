"""MutexNet (SPEC §2): shapes, the plain main path, export to torchvision, pretrained loading."""
import pytest
import torch
import torchvision
from torch import nn

import mutex_attn as ma
from mutex_attn.models import MutexNet, MutexOutput

FACTORIES = {
    "resnet50": (ma.models.manet_resnet50, [64, 256, 512, 1024, 2048]),
    "densenet169": (ma.models.manet_densenet169, [64, 128, 256, 640, 1664]),
}


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def net(request):
    torch.manual_seed(0)
    factory, _ = FACTORIES[request.param]
    return request.param, factory(num_classes=2)


def test_shapes(net):
    name, model = net
    expected_channels = FACTORIES[name][1]
    assert [a.channels for a in model.attention] == expected_channels
    x, xm = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    model.train()
    out = model(x, xm)
    assert isinstance(out, MutexOutput)
    assert out.logits.shape == out.logits_mutex.shape == (2, 2)
    assert out.features.shape == out.features_mutex.shape == (2, expected_channels[-1], 2, 2)
    assert model(x).shape == (2, 2)
    loss = ma.losses.AdaptiveMutexLoss()(out, torch.tensor([0, 1]), torch.tensor([1, 0]))
    loss.backward()
    # The mutex path trains the attention blocks and, through MAB's x input, the shared stages.
    assert model.attention[0].fab.gate.fc1.weight.grad.abs().sum() > 0
    assert next(model.stages[0].parameters()).grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_main_path_is_the_plain_backbone_and_ignores_the_mutex_input(net):
    _, model = net
    model.train()  # batch statistics: the mutex images must not leak into the main path
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        a = model(x, torch.randn(2, 3, 64, 64))
        b = model(x, torch.randn(2, 3, 64, 64) * 5)
    assert torch.equal(a.logits, plain) and torch.equal(b.logits, plain)
    assert not torch.equal(a.logits_mutex, b.logits_mutex)


def test_only_the_main_path_updates_the_running_statistics(net):
    """Inference runs the main path alone, so the stages' BatchNorm running statistics must
    describe it: a training step on (x, x_mutex) updates them exactly as forward(x) does."""
    import copy

    _, model = net
    model.train()
    plain = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x, torch.randn(2, 3, 64, 64) * 3)
        plain(x)
    for (name, a), (_, b) in zip(model.stages.named_buffers(), plain.stages.named_buffers()):
        assert torch.equal(a, b), name
    # while the gate networks (only on the mutex path) do track theirs
    gate_bn = model.attention[0].fab.gate.bn1
    assert int(gate_bn.num_batches_tracked) == int(plain.attention[0].fab.gate.bn1.num_batches_tracked) + 1
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_export_matches_forward_exactly(net):
    name, model = net
    # Perturb every weight and BN statistic so that the export is checked away from the init.
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.mul_(1 + 0.05 * torch.rand_like(t))
    model.eval()
    exported = model.export_backbone().eval()
    assert type(exported) is {"resnet50": torchvision.models.ResNet, "densenet169": torchvision.models.DenseNet}[name]
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(exported(x), model(x))
    # A standalone copy: no MutexAttention inside, no parameter shared with the MutexNet.
    assert not any(isinstance(m, ma.MutexAttention) for m in exported.modules())
    own = {p.data_ptr() for p in model.parameters()}
    assert not own & {p.data_ptr() for p in exported.parameters()}
    # It loads into a fresh torchvision model of the same kind.
    fresh = getattr(torchvision.models, name)(num_classes=2)
    fresh.load_state_dict(exported.state_dict())


def test_generic_mutex_net_infers_channels_and_exports():
    stages = [
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
    ]
    model = MutexNet(stages, nn.Linear(16, 3))
    assert [a.channels for a in model.attention] == [8, 16]
    assert model.stages[0][1].num_batches_tracked.item() == 0  # the probe left BN untouched
    x = torch.randn(4, 3, 10, 10)
    out = model(x, torch.randn(4, 3, 10, 10))
    assert out.logits.shape == (4, 3) and out.features.shape == (4, 16, 5, 5)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.export_backbone().eval()(x), model(x))


def test_mismatched_mutex_input():
    model = MutexNet([nn.Conv2d(3, 4, 1)], nn.Linear(4, 2))
    with pytest.raises(ValueError, match="x_mutex"):
        model(torch.randn(2, 3, 8, 8), torch.randn(1, 3, 8, 8))


def test_pretrained_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ma.models.manet_resnet50(pretrained=True)


def test_pretrained_from_local_file(tmp_path):
    source = torchvision.models.resnet50()  # stands in for the ImageNet checkpoint
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    model = ma.models.manet_resnet50(num_classes=2, pretrained=str(path))
    assert torch.equal(model.stages[1][0].conv1.weight, source.layer1[0].conv1.weight)
    assert model.head.out_features == 2  # the 1000-class head is not loaded into a 2-class one


def test_densenet_old_checkpoint_keys(tmp_path):
    source = torchvision.models.densenet169()
    # Old torchvision checkpoints spell "norm1" as "norm.1".
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in source.state_dict().items()}
    assert any("norm.1." in k for k in old)
    path = tmp_path / "densenet169.pth"
    torch.save(old, path)
    model = ma.models.manet_densenet169(pretrained=str(path))
    assert torch.equal(model.stages[1].denseblock1.denselayer1.norm1.weight, source.features.denseblock1.denselayer1.norm1.weight)


def _tiny_stages():
    torch.manual_seed(0)
    return [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())]


@pytest.mark.parametrize("blocks", ["none", "mab", "mab+fab"])
def test_block_ablations_compute_what_they_say(blocks):
    stages = _tiny_stages()
    net = MutexNet(stages, nn.Linear(16, 2), blocks=blocks, backend="reference").eval()
    x, xm = torch.randn(2, 3, 12, 12), torch.randn(2, 3, 12, 12)
    out = net(x, xm)
    f, g = x, xm
    for stage, unit in zip(net.stages, net.attention):
        f = stage(f)
        y = stage(g)
        if blocks == "none":
            g = y  # the mutex path is the plain backbone on the mutex image
        elif blocks == "mab":
            g = ma.mab(f, y, backend="reference")
        else:
            g = unit(f, y)
    torch.testing.assert_close(out.features_mutex, g)
    torch.testing.assert_close(out.logits_mutex, net.head(net.pool(g)))
    torch.testing.assert_close(out.logits, net(x))  # the main path never changes
    n_params = sum(p.numel() for p in net.attention.parameters())
    assert (n_params > 0) == (blocks == "mab+fab")  # only FAB has parameters


def test_unknown_blocks():
    with pytest.raises(ValueError, match="unknown blocks 'fab'"):
        MutexNet(_tiny_stages(), nn.Linear(16, 2), blocks="fab")


def test_create_model_names():
    from mutex_attn.models import MODEL_NAMES, create_model

    x = torch.randn(2, 3, 32, 32)
    for name in MODEL_NAMES:
        model = create_model(name).eval()
        assert model(x).shape == (2, 2), name
        assert isinstance(model, MutexNet) == name.startswith("manet_")
    # the timm baselines really carry their attention modules
    assert any("se" in type(m).__name__.lower() for m in create_model("seresnet50").modules())
    assert any("cbam" in type(m).__name__.lower() for m in create_model("cbam_resnet50").modules())
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        create_model("vgg")
