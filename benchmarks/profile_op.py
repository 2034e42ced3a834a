"""Where one MutexAttention / FAB forward+backward spends its time, per provider: wall time
per step against the GPU's busy time (the sum of its kernels), the number of launches, and
the time beyond the kernels per launch. A step whose wall time is far above its kernel time
is bound by the host (Python, dispatch, launches), not by the kernels: the case the
benchmark's ratios cannot show on their own. (On an H100 VM, 2026-11-28: ~36-41 us per
launch for compile, native and triton alike; benchmarks/RESULTS.md.)

    python benchmarks/profile_op.py --device cuda --shape 32,256,56,56 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import mutex_attn as ma

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _step_fn(op, provider, shape, dtype, layout, device):
    torch.manual_seed(0)
    n, c, h, w = shape
    block = (ma.MutexAttention(c) if op == "mutex_attention" else ma.FusionAttentionBlock(c)).to(device)
    block.backend = "reference" if provider == "compile" else provider
    fn = torch.compile(copy.deepcopy(block)) if provider == "compile" else block
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    y = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    dout = torch.randn_like(x)

    def step():
        fn(x, y).backward(dout)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--op", default="mutex_attention", choices=["mutex_attention", "fab"])
    p.add_argument("--providers", default="reference,compile,native,triton")
    p.add_argument("--shape", default="32,256,56,56")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--layout", default="contiguous", choices=["contiguous", "channels_last"])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"{args.op} {args.shape} {args.dtype} {args.layout} on {args.device}")
    print(f"{'provider':10s} {'wall ms':>8s} {'kernels ms':>10s} {'launches':>8s} {'host us/launch':>14s}  busiest kernels")
    for provider in args.providers.split(","):
        if provider not in ("reference", "compile") and provider not in ma.available_backends(args.device):
            print(f"{provider:10s} unavailable here")
            continue
        step = _step_fn(args.op, provider, shape, DTYPES[args.dtype], args.layout, args.device)
        for _ in range(3):
            step()
        sync()
        walls = []
        for _ in range(args.reps):
            t = time.perf_counter()
            step()
            sync()
            walls.append((time.perf_counter() - t) * 1e3)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                step()
            sync()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 5 / 1e3
        by_name: dict[str, float] = {}
        for e in kernels:
            by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 5 / 1e3
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:3]
        tops = "; ".join(f"{name[:40]} {ms:.3f}" for name, ms in top)
        wall, launches = statistics.median(walls), len(kernels) // 5
        # what the GPU waits for, per launch: the step's cost beyond its kernels
        per_launch = f"{(wall - busy) * 1e3 / launches:14.0f}" if launches else f"{'-':>14s}"
        print(f"{provider:10s} {wall:8.3f} {busy:10.3f} {launches:8d} {per_launch}  {tops}")


if __name__ == "__main__":
    main()
