"""`make demo`: what runs today, on built-in generated data, end to end.

1. Every backend available on this machine against the reference (MutexAttention forward and
   backward on a ResNet-50 stage-2-like tensor): max difference and median time.
2. A few MA-Net (ResNet-50) training steps on generated images: class-1 images carry bright
   blobs, class-0 images do not. This is a smoke run of model + pairing + loss + SGD, not a
   medical result: the synthetic CT data and the real trainer belong to the application.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, Dataset

import mutex_attn as ma
from mutex_attn.data import MutexPairDataset
from mutex_attn.losses import AdaptiveMutexLoss


class BlobImages(Dataset):
    """Noise images; class 1 adds 1-3 bright Gaussian blobs. Deterministic per index."""

    def __init__(self, n: int, size: int, seed: int = 0):
        self.size, self.seed = size, seed
        self.targets = [i % 2 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        img = 0.3 * torch.randn(3, self.size, self.size, generator=g)
        if self.targets[i] == 1:
            yy, xx = torch.meshgrid(torch.arange(self.size), torch.arange(self.size), indexing="ij")
            for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
                cy, cx = torch.randint(0, self.size, (2,), generator=g).tolist()
                r = self.size / 10
                img += 2.0 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        return img, self.targets[i]


def _median_ms(fn, repeats=5):
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compare_backends(shape=(4, 256, 28, 28)) -> None:
    print(f"\n== MutexAttention forward+backward, {list(shape)} float32, CPU ==")
    torch.manual_seed(0)
    x, y = torch.randn(shape), torch.randn(shape)
    dout = torch.randn(shape)
    reference = ma.MutexAttention(shape[1], backend="reference")
    names = ["reference"] + [n for n in ma.available_backends("cpu") if n != "reference"]
    expected = None
    for name in names:
        block = ma.MutexAttention(shape[1], backend=name)
        block.load_state_dict(reference.state_dict())

        def step(block=block):
            xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
            out = block(xr, yr)
            out.backward(dout)
            return out, xr.grad, yr.grad

        got = step()
        expected = expected or got
        diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, expected))
        print(f"  {name:10s} median {_median_ms(step):8.2f} ms   "
              f"max |diff| / max |reference| over out, dx, dy: {diff:.1e}")


def train_steps(steps: int, batch: int, size: int) -> None:
    print(f"\n== MA-Net ResNet-50: {steps} SGD steps, batch {batch}, {size}x{size} generated images ==")
    torch.manual_seed(0)
    model = ma.models.manet_resnet50(num_classes=2).train()
    pairs = MutexPairDataset(BlobImages(batch * steps, size), seed=0)
    loader = DataLoader(pairs, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    loss_fn = AdaptiveMutexLoss("adaptive")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    print(f"  {'step':>4} {'loss':>8} {'L_CE':>8} {'L_CS':>8} {'a1':>6} {'a2':>6} {'s/step':>7}")
    for step, (x, y, xm, ym) in enumerate(loader, 1):
        t0 = time.perf_counter()
        parts = loss_fn(model(x, xm), y, ym, return_parts=True)
        opt.zero_grad(set_to_none=True)
        parts.loss.backward()
        opt.step()
        print(
            f"  {step:>4} {parts.loss.item():8.4f} {parts.ce.item():8.4f} {parts.cs.item():8.4f} "
            f"{parts.weight_ce.item():6.3f} {parts.weight_cs.item():6.3f} {time.perf_counter() - t0:7.2f}"
        )
    exported = model.eval().export_backbone().eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        same = torch.equal(exported(x), model(x))
    print(f"  exported plain {type(exported).__name__}: eval outputs equal MutexNet's: {same}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    args = parser.parse_args(argv)
    print(f"mutex_attn {ma.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"backends available on CPU: {ma.available_backends('cpu')}")
    compare_backends()
    train_steps(args.steps, args.batch, args.size)


if __name__ == "__main__":
    main()
