"""Operator benchmark: MAB and MutexAttention per provider, side by side in one run.

Providers: reference (eager PyTorch, the baseline), compile (torch.compile of the reference),
native (the C++/CUDA extension), triton (when available). Per row: median time with p20/p80,
speedup vs eager and vs compile, achieved GB/s of the minimal traffic (SPEC §1 passes) and
that as a % of a copy of the same working-set size, measured in the same run.

    python benchmarks/bench_ops.py                          # CPU, 2 threads, stage-1 shape
    python benchmarks/bench_ops.py --shapes stages --batch 4
    python benchmarks/bench_ops.py --device cuda --batch 32 --dtype bfloat16 --shapes stages

Results are appended to benchmarks/results/ops.csv with device, versions and git commit.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import mutex_attn as ma

# ResNet-50 stage outputs at 224 px: stem, layer1..4 as (C, H, W).
STAGES = {
    "stem": (64, 56, 56), "layer1": (256, 56, 56), "layer2": (512, 28, 28),
    "layer3": (1024, 14, 14), "layer4": (2048, 7, 7),
}
# Minimal full-tensor passes (reads + writes of [N, C, H, W] tensors), SPEC §1.
PASSES = {
    ("mab", "forward"): 3, ("mab", "backward"): 5, ("mab", "full"): 8,
    ("mutex_attention", "forward"): 5, ("mutex_attention", "backward"): 8,
    ("mutex_attention", "full"): 13,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, reps, warmup=3, setup=None):
    """Median, p20, p80 in ms of fn() (setup() runs untimed before each call)."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(reps):
        if setup:
            setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return statistics.median(times), q(0.2), q(0.8)


def copy_bandwidth(numel, dtype, device, reps):
    """GB/s of dst.copy_(src) for tensors of this size (read + write)."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms, _, _ = measure(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def make_fn(op, provider, channels, device, dtype, compiled_cache):
    """A callable (x, y) -> output for the op on this provider."""
    backend = "reference" if provider in ("reference", "compile") else provider
    if op == "mab":
        fn = lambda x, y: ma.mab(x, y, backend=backend)
    else:
        torch.manual_seed(0)  # every provider gets the same parameters
        block = ma.MutexAttention(channels, backend=backend).to(device)
        fn = block
    if provider == "compile":
        key = (op, channels)
        if key not in compiled_cache:
            compiled_cache[key] = torch.compile(fn)
        fn = compiled_cache[key]
    return fn


def bench_case(op, provider, shape, mode, device, dtype, layout, reps, compiled_cache):
    n, c, h, w = shape
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = lambda: torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    x, y, dout = gen().requires_grad_(), gen().requires_grad_(), gen()
    fn = make_fn(op, provider, c, device, dtype, compiled_cache)

    def clear():
        x.grad = y.grad = None

    if mode == "forward":
        return measure(lambda: fn(x, y), device, reps)
    if mode == "full":
        return measure(lambda: fn(x, y).backward(dout), device, reps, setup=clear)
    state = {}

    def fresh_graph():
        clear()
        state["out"] = fn(x, y)

    return measure(lambda: state["out"].backward(dout), device, reps, setup=fresh_graph)


def git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def allocator_settings():
    """The glibc malloc tuning in effect (it decides how often big outputs page-fault)."""
    tuned = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("MALLOC_", "THP_MEM"))]
    return " ".join(tuned) or "default"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--ops", default="mutex_attention,mab")
    p.add_argument("--providers", default="reference,compile,native,triton")
    p.add_argument("--shapes", default="layer1", help="comma list of stage names, or 'stages' for all five")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224, help="image size; stage shapes scale with it")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--layout", default="contiguous", choices=["contiguous", "channels_last"])
    p.add_argument("--modes", default="full")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="few repetitions, stage-1 shape only")
    p.add_argument("--csv", default=str(Path(__file__).parent / "results" / "ops.csv"))
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.quick:
        args.reps = 5
    dtype = DTYPES[args.dtype]
    names = list(STAGES) if args.shapes == "stages" else args.shapes.split(",")
    scale = args.size / 224
    shapes = {nm: (args.batch, STAGES[nm][0], round(STAGES[nm][1] * scale), round(STAGES[nm][2] * scale)) for nm in names}
    available = ma.available_backends(device)
    providers = [pr for pr in args.providers.split(",")
                 if pr == "compile" or pr in available]
    skipped = [pr for pr in args.providers.split(",") if pr not in providers]

    print(f"device: {device_name(device)}; torch {torch.__version__}; commit {git_commit()}; "
          f"{args.dtype}, {args.layout}; reps {args.reps}; allocator: {allocator_settings()}" + (f"; not available here: {skipped}" if skipped else ""))
    rows, compiled_cache = [], {}
    header = (f"{'op':16s} {'shape':16s} {'mode':8s} {'provider':9s} {'median ms':>9s} {'p20':>7s} "
              f"{'p80':>7s} {'vs eager':>8s} {'vs comp':>8s} {'GB/s':>7s} {'%copy':>6s}")
    print(header)
    for shape_name, shape in shapes.items():
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        elem = torch.empty((), dtype=dtype).element_size()
        bw = copy_bandwidth(numel, dtype, device, args.reps)
        for op in args.ops.split(","):
            for mode in args.modes.split(","):
                times = {}
                for provider in providers:
                    times[provider] = bench_case(op, provider, shape, mode, device, dtype,
                                                 args.layout, args.reps, compiled_cache)
                for provider, (med, p20, p80) in times.items():
                    gbs = PASSES[(op, mode)] * numel * elem / (med * 1e-3) / 1e9
                    vs_eager = times["reference"][0] / med if "reference" in times else float("nan")
                    vs_comp = times["compile"][0] / med if "compile" in times else float("nan")
                    print(f"{op:16s} {'x'.join(map(str, shape)):16s} {mode:8s} {provider:9s} {med:9.3f} {p20:7.3f} "
                          f"{p80:7.3f} {vs_eager:7.2f}x {vs_comp:7.2f}x {gbs:7.1f} {100 * gbs / bw:5.0f}%")
                    rows.append(dict(
                        device=device_name(device), torch=torch.__version__, commit=git_commit(),
                        op=op, shape="x".join(map(str, shape)), stage=shape_name, mode=mode,
                        provider=provider, dtype=args.dtype, layout=args.layout, median_ms=f"{med:.4f}",
                        p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}", speedup_vs_eager=f"{vs_eager:.3f}",
                        speedup_vs_compile=f"{vs_comp:.3f}", gbps=f"{gbs:.2f}", copy_gbps=f"{bw:.2f}",
                        allocator=allocator_settings(),
                    ))
        print(f"{'':16s} copy bandwidth at this size: {bw:.1f} GB/s")
    if args.csv and rows:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
