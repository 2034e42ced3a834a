"""`mutex-attn cam`: where the model looks.

For each chosen image, one PNG with
  - the CT slice, and its Grad-CAM for the COVID class (pytorch-grad-cam) on the last stage of
    the plain backbone, the path that makes every diagnosis;
  - for MA-Net, the paper's Fig. 9 view: the channel-mean feature map of the last stage
    before attention, after MAB and after FAB, upsampled bilinearly to the image.

Fig. 9 needs a mutex pair: the chosen image goes through the mutex path (MutexAttention
re-weights the mutex path's features y by where they differ from the main path's x), and its
partner, a fixed image of the other class, through the main path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mutex_attn.models import MutexNet


def target_layer(model: nn.Module) -> nn.Module:
    """The last feature stage of any model `create_model` builds."""
    if isinstance(model, MutexNet):
        return model.stages[-1]
    for name in ("layer4", "features"):
        if hasattr(model, name):
            return getattr(model, name)
    raise ValueError(f"no known last stage in {type(model).__name__}")


def grad_cam(model: nn.Module, x: torch.Tensor, target_class: int = 1) -> np.ndarray:
    """Grad-CAM maps [N, H, W] in [0, 1] for `target_class` (1 = COVID)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(target_class)] * len(x))


@torch.no_grad()
def attention_views(model: MutexNet, image: torch.Tensor, partner: torch.Tensor) -> dict[str, np.ndarray]:
    """The paper's Fig. 9 maps for `image` [N, 3, H, W], each [N, H, W] scaled to [0, 1]:
    the last stage's features before attention, after MAB, and after MAB + FAB."""
    from mutex_attn.modules import MutexAttention, mab

    if model.blocks != "mab+fab":
        raise ValueError(f"Fig. 9 needs MAB and FAB; this model was built with blocks={model.blocks!r}")
    model.eval()
    f, g = partner, image
    for i, (stage, attention) in enumerate(zip(model.stages, model.attention)):
        f = stage(f)
        y = stage(g)
        if i == len(model.stages) - 1:
            assert isinstance(attention, MutexAttention)
            maps = {"features": y, "after MAB": mab(f, y, backend=attention.backend),
                    "after FAB": attention(f, y)}
        g = attention(f, y)
    size = image.shape[-2:]
    out = {}
    for name, t in maps.items():
        m = F.interpolate(t.float().mean(1, keepdim=True), size=size, mode="bilinear",
                          align_corners=False)[:, 0]
        lo = m.amin(dim=(1, 2), keepdim=True)
        hi = m.amax(dim=(1, 2), keepdim=True)
        span = hi - lo
        flat = span <= 1e-6 * torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-12)
        out[name] = torch.where(flat, 0.0, (m - lo) / span.clamp_min(1e-30)).cpu().numpy()
    return out


def denormalise(x: torch.Tensor) -> np.ndarray:
    from mutex_attn.data.transforms import MEAN, STD

    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def save_panel(path: Path, image: torch.Tensor, maps: dict[str, np.ndarray], title: str) -> None:
    """One row: the image, then each map overlaid on it."""
    from matplotlib.figure import Figure

    rgb = denormalise(image)
    fig = Figure(figsize=(2.6 * (1 + len(maps)), 3.0))
    axes = fig.subplots(1, 1 + len(maps))
    axes[0].imshow(rgb)
    axes[0].set_title("CT slice", fontsize=9)
    for ax, (name, m) in zip(axes[1:], maps.items()):
        ax.imshow(rgb)
        ax.imshow(m, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_cam(
    checkpoint, *, images: list[str] | None = None, data: str | None = None, split: str = "test",
    count: int = 6, output: str | None = None, device: str = "cpu", seed: int = 0, log=print,
) -> list[Path]:
    """Write one panel PNG per image; images are files, or `count` picked from `split`
    (alternating classes, deterministic from `seed`)."""
    from PIL import Image

    from mutex_attn.data.datasets import SliceDataset, load_dataset
    from mutex_attn.data.transforms import eval_transform
    from mutex_attn.evaluate import resolve_checkpoint
    from mutex_attn.train import load_checkpoint, model_from_checkpoint, pick_device

    path = resolve_checkpoint(checkpoint)
    model, config = model_from_checkpoint(load_checkpoint(path))
    dev = pick_device(device)
    model = model.to(dev).eval()
    tf = eval_transform(config.img_size)
    data = data or config.data
    pool = None
    if data:
        pool = SliceDataset(load_dataset(
            data, split, kind=config.dataset, seed=config.seed,
            val_fraction=config.val_fraction, test_fraction=config.test_fraction,
        ), transform=tf)
    rng = np.random.default_rng(seed)
    if images:
        chosen = [(Path(p).name, tf(Image.open(p).convert("RGB")), None) for p in images]
    else:
        if pool is None:
            raise ValueError("give --images, or --data to pick images from")
        chosen = []
        by_class = {c: [i for i, t in enumerate(pool.targets) if t == c] for c in (1, 0)}
        for k in range(count):
            members = by_class[1 - k % 2] or by_class[k % 2]
            i = int(members[rng.integers(len(members))])
            x, y = pool[i]
            chosen.append((Path(pool.slices[i].source).name, x, y))

    out = Path(output) if output else path.parent / "cam"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, x, label in chosen:
        x = x.unsqueeze(0).to(dev)
        with torch.no_grad():
            prob = torch.softmax(model(x).float(), 1)[0, 1].item()
        maps = {"Grad-CAM (COVID)": grad_cam(model, x)[0]}
        if isinstance(model, MutexNet) and model.blocks == "mab+fab" and pool is not None:
            partner = _partner(pool, label, rng)
            maps.update(attention_views(model, x, partner.unsqueeze(0).to(dev)))
        truth = "" if label is None else f", truth {'COVID' if label == 1 else 'non-COVID'}"
        file = out / f"cam_{Path(name).stem}.png"
        save_panel(file, x[0], {k: v[0] if v.ndim == 3 else v for k, v in maps.items()},
                   f"{name}: P(COVID) = {prob:.2f}{truth}")
        written.append(file)
    log(f"wrote {len(written)} Grad-CAM panels to {out}")
    return written


def _partner(pool, label, rng) -> torch.Tensor:
    """An image of the other class (any image when the label is unknown)."""
    other = [i for i, t in enumerate(pool.targets) if label is None or t != label] or list(range(len(pool)))
    return pool[int(other[rng.integers(len(other))])][0]
