"""Training-step benchmark: one MA-Net ResNet-50 step per backend, side by side in one run.

A step is what the trainer does per batch: the forward of both paths (main image x and its
mutex image x_mutex, MutexAttention after the stem and each stage), the adaptive loss
(ma.losses.AdaptiveMutexLoss), backward, an SGD step (momentum 0.9, weight decay 1e-4) and
zero_grad. The reference line is torchvision's plain ResNet-50 on the main images only with
cross-entropy (one path: about half of MA-Net's backbone work).

Configurations: every --backends entry (reference = eager PyTorch blocks, native = C++/CUDA,
triton where it runs) plus `resnet50`, for each of eager / torch.compile (of the forward and
the loss; backward through the compiled graph, optimizer eager), --amp (none = float32,
bf16 = torch.autocast bfloat16), and layout (NCHW, channels_last: model and inputs).

The configurations of one amp × layout group are built and warmed up first, then timed
interleaved (one step of each per round, the order rotating), so that load from elsewhere hits
them alike and the ratios hold on a shared machine.

Reported per configuration: median step time with p20/p80 (ms), images/s = batch / median
step time counting the MAIN-PATH images only (an MA-Net step also runs the backbone on as
many mutex images; the ResNet-50 line counts its one path), the first step's time (includes
compilation when compiled), speedup vs the eager reference backend and vs the reference
backend in the same mode, step time relative to the ResNet-50 line, and peak memory: on CUDA
torch.cuda.max_memory_allocated during its timed steps less the other configurations' resident
memory (so: its weights, gradients, momentum, input batch and activations), and its resident
memory between steps (weights, momentum, batch: static_mem_mb); on CPU not measured
(NaN: RSS deltas from getrusage are too coarse and the allocators keep freed memory).

    python benchmarks/bench_train_step.py --quick                 # CPU: < 1 min, eager only
    python benchmarks/bench_train_step.py                         # CPU: batch 8, 112 px, all configs
    python benchmarks/bench_train_step.py --device cuda --batch 32 --amp bf16 --channels-last \\
        --backends reference,native,triton --no-compile --steps 10

On CPU, compiling MA-Net's step takes tens of seconds per configuration (more on a cold
cache), so --quick leaves it out there (add --compile to have it). On the shared 2-core VM, a
2-thread run next to any other busy process stalls in OpenMP barriers (steps 10-20x slower);
--threads 1 gives steadier numbers there. Rows go to --csv (default
benchmarks/results/train_step.csv) with the same metadata columns as bench_ops.py.
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ops  # noqa: E402  (metadata, CSV and quantile helpers)

import mutex_attn as ma  # noqa: E402
from mutex_attn.backends import unavailable_reason  # noqa: E402
from mutex_attn.models import create_model  # noqa: E402

BASELINE = "resnet50"
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = [
    "device", "torch", "triton", "commit", "git_dirty", "model", "backend", "compiled", "amp",
    "layout", "batch", "size", "steps", "median_ms", "p20_ms", "p80_ms", "images_per_s",
    "images_counted", "first_step_s", "speedup_vs_eager_reference", "speedup_vs_reference",
    "rel_to_resnet50", "peak_mem_mb", "static_mem_mb", "loss", "allocator", "threads",
    "device_type", "device_detail", "python", "timestamp",
]
DEFAULTS = {  # (device type, quick) -> defaults for the options left unset
    ("cpu", False): dict(batch=8, size=112, steps=5, warmup=2, amp="none,bf16", layout="contiguous,channels_last", compile=True),
    ("cpu", True): dict(batch=8, size=112, steps=3, warmup=1, amp="none", layout="contiguous", compile=False),
    ("cuda", False): dict(batch=32, size=224, steps=20, warmup=5, amp="none,bf16", layout="contiguous,channels_last", compile=True),
    ("cuda", True): dict(batch=32, size=224, steps=10, warmup=3, amp="bf16", layout="channels_last", compile=False),
}


def build(name: str, backend: str, device: torch.device, channels_last: bool):
    torch.manual_seed(0)  # the same weights for every configuration
    model = create_model("resnet50") if name == BASELINE else create_model("manet_resnet50", backend=backend)
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return model, opt


def make_step(name, model, opt, amp_dtype, compiled, device):
    criterion = ma.losses.AdaptiveMutexLoss()

    def forward_loss(x, x_mutex, target, target_mutex):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if name == BASELINE:
                return F.cross_entropy(model(x).float(), target)
            return criterion(model(x, x_mutex), target, target_mutex)

    if compiled:  # the caches are reset once per group (run_group), not here: see there
        forward_loss = torch.compile(forward_loss)

    def step(batch):
        loss = forward_loss(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


class Config:
    """One configuration, built and warmed up: model, optimizer, step and input batch."""

    def __init__(self, name, backend, compiled, amp, layout, args, device):
        self.name, self.backend, self.compiled, self.amp, self.layout = name, backend, compiled, amp, layout
        self.device = device
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        channels_last = layout == "channels_last"
        self.model, self.opt = build(name, backend, device, channels_last)
        self.step = make_step(name, self.model, self.opt, AMP[amp], compiled, device)
        g = torch.Generator().manual_seed(1)
        n, s = args.batch, args.size
        x, x_mutex = (torch.randn(n, 3, s, s, generator=g) for _ in range(2))
        target = torch.randint(0, 2, (n,), generator=g)
        batch = [x, x_mutex, target, 1 - target]  # the mutex image is of the other class
        batch = [t.to(device) for t in batch]
        if channels_last:
            batch = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in batch]
        self.batch = batch
        self.first = float("nan")
        t0 = time.perf_counter()
        for i in range(max(args.warmup, 1 if compiled else 0)):  # a compiled step warms up once at least
            self.run()
            if i == 0:
                self.first = time.perf_counter() - t0
        # weights, momentum and the batch (gradients are set to None after each step)
        self.static = (torch.cuda.memory_allocated(device) - before) / 2**20 if device.type == "cuda" else float("nan")
        self.peak = float("nan")
        self.times: list[float] = []
        self.loss = float("nan")

    def run(self):
        loss = self.step(self.batch)
        bench_ops.sync(self.device)
        return loss

    def timed_step(self):
        """One step, timed; on CUDA also its peak memory beyond the other configurations'."""
        cuda = self.device.type == "cuda"
        if cuda:
            bench_ops.sync(self.device)
            others = torch.cuda.memory_allocated(self.device) / 2**20 - self.static
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        loss = self.run()
        self.times.append((time.perf_counter() - t) * 1e3)
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20 - others
            self.peak = peak if math.isnan(self.peak) else max(self.peak, peak)
        self.loss = float(loss.detach().float())

    def release(self):
        del self.model, self.opt, self.step, self.batch


def run_group(specs, args, device) -> list[Config]:
    """Build and warm up every configuration, then time them interleaved: one step of each per
    round, the order rotating, so that load from elsewhere hits them alike. A configuration
    that fails is reported and left out."""
    torch._dynamo.reset()  # not between the configurations: that would drop their graphs
    for key in ("recompile_limit", "cache_size_limit"):  # one graph per compiled configuration
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(64, getattr(torch._dynamo.config, key)))
    configs = []
    for spec in specs:
        try:
            configs.append(Config(*spec, args, device))
        except Exception as err:  # report and go on with the others
            report_failure(spec, err, device)
    for r in range(args.steps):
        for cfg in configs[r % len(configs):] + configs[:r % len(configs)] if configs else []:
            if cfg.times is None:
                continue
            try:
                cfg.timed_step()
            except Exception as err:
                report_failure((cfg.name, cfg.backend, cfg.compiled, cfg.amp, cfg.layout), err, device)
                cfg.times = None
    done = [c for c in configs if c.times]
    for cfg in configs:
        cfg.release()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return done


def report_failure(spec, err, device):
    name, backend, compiled, amp, layout = spec
    msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    print(f"FAILED {name} {backend} {'compile' if compiled else 'eager'} {amp} {layout}: "
          f"{type(err).__name__}: {msg}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratio(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}x"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads); 0 keeps torch's choice")
    p.add_argument("--batch", type=int, default=None, help="main-path images a step (default CPU 8, CUDA 32)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default CPU 112, CUDA 224)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default CPU 5, CUDA 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default CPU 2, CUDA 5)")
    p.add_argument("--backends", default="reference,native,triton",
                   help="MA-Net backends, comma list; the unavailable ones are skipped with the reason")
    p.add_argument("--no-baseline", action="store_true", help=f"leave out the plain {BASELINE} line")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also run each configuration torch.compile'd (default on; off with --quick on CPU)")
    p.add_argument("--amp", default=None, help="comma list of none, bf16, fp16 (default none,bf16)")
    p.add_argument("--layout", default=None, help="comma list of contiguous, channels_last (default both)")
    p.add_argument("--channels-last", action="store_true", help="channels_last only (same as --layout channels_last)")
    p.add_argument("--quick", action="store_true",
                   help="few steps, one amp/layout, no compile on CPU: under a minute on 2 CPU cores")
    p.add_argument("--csv", default=str(Path(__file__).parent / "results" / "train_step.csv"),
                   help="append rows here ('' for none)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.channels_last:
        args.layout = "channels_last"
    for key, value in DEFAULTS[("cuda" if device.type == "cuda" else "cpu", args.quick)].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args, device


def main(argv=None) -> list[dict]:
    args, device = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # a step killed by `timeout` keeps its lines
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amps, layouts = bench_ops.split(args.amp), bench_ops.split(args.layout)
    for name, values, allowed in (("amp", amps, AMP), ("layout", layouts, bench_ops.LAYOUTS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"unknown {name} {bad}; choose from {', '.join(allowed)}")
    backends, skipped = [], {}
    for b in bench_ops.split(args.backends):
        reason = unavailable_reason(b, device)
        if reason is None and b == "triton" and device.type == "cpu":
            reason = "on CPU it runs under Triton's interpreter (hours for a ResNet-50 step)"
        if reason:
            skipped[b] = reason
        else:
            backends.append(b)
    models = [("manet_resnet50", b) for b in backends] + ([] if args.no_baseline else [(BASELINE, "-")])
    modes = [False, True] if args.compile else [False]
    meta = bench_ops.metadata(device)

    print(f"device: {meta['device']} [{meta['device_detail']}]; torch {meta['torch']}; "
          f"triton {meta['triton'] or '-'}; commit {meta['commit']}"
          f"{' (+local changes)' if meta['git_dirty'] == 'yes' else ''}; batch {args.batch} (main-path "
          f"images; MA-Net also runs as many mutex images), {args.size} px, {args.steps} steps after "
          f"{args.warmup} warm-up; allocator: {meta['allocator']}")
    for b, reason in skipped.items():
        print(f"skipped backend {b}: {reason}")
    if not args.compile:
        print("torch.compile: not run" + (" (--quick on CPU: compiling takes tens of seconds a configuration here; add --compile)"
                                           if args.quick and device.type == "cpu" else ""))
    if device.type == "cpu":
        print("peak memory: not measured on CPU (NaN)")
    print(f"{'model':15s} {'backend':9s} {'mode':7s} {'amp':4s} {'layout':6s} {'median ms':>9s} {'p20':>8s} "
          f"{'p80':>8s} {'img/s':>7s} {'first s':>7s} {'vs eager ref':>12s} {'vs ref':>7s} {'/resnet50':>9s} "
          f"{'peak MB':>8s}")
    all_rows = []
    for amp in amps:
        for layout in layouts:
            specs = [(name, backend, compiled, amp, layout) for compiled in modes for name, backend in models]
            done = run_group(specs, args, device)
            meds = {(c.name, c.backend, c.compiled): bench_ops.quantiles(c.times)[0] for c in done}
            eager_ref = meds.get(("manet_resnet50", "reference", False))
            for compiled in modes:
                results = [c for c in done if c.compiled == compiled]
                ref = meds.get(("manet_resnet50", "reference", compiled))
                base = meds.get((BASELINE, "-", compiled))
                rows = []
                for c in results:
                    name, backend, first, peak, static, loss = c.name, c.backend, c.first, c.peak, c.static, c.loss
                    med, p20, p80 = bench_ops.quantiles(c.times)
                    nan = float("nan")
                    vs_eager = eager_ref / med if eager_ref and name != BASELINE else nan
                    vs_ref = ref / med if ref and name != BASELINE else nan
                    rel = med / base if base else nan
                    ips = args.batch / (med * 1e-3)
                    mode = "compile" if compiled else "eager"
                    print(f"{name:15s} {backend:9s} {mode:7s} {amp:4s} "
                          f"{'NHWC' if layout == 'channels_last' else 'NCHW':6s} {med:9.1f} {p20:8.1f} {p80:8.1f} "
                          f"{ips:7.1f} {first:7.1f} {ratio(vs_eager):>12s} {ratio(vs_ref):>7s} {ratio(rel):>9s} "
                          f"{'-' if math.isnan(peak) else f'{peak:.0f}':>8s}")
                    rows.append(dict(
                        meta, model=name, backend=backend, compiled=mode, amp=amp, layout=layout,
                        batch=args.batch, size=args.size, steps=args.steps, median_ms=bench_ops.fmt(med),
                        p20_ms=bench_ops.fmt(p20), p80_ms=bench_ops.fmt(p80),
                        images_per_s=bench_ops.fmt(ips),
                        images_counted="main path" if name != BASELINE else "all (one path)",
                        first_step_s=bench_ops.fmt(first), speedup_vs_eager_reference=bench_ops.fmt(vs_eager),
                        speedup_vs_reference=bench_ops.fmt(vs_ref), rel_to_resnet50=bench_ops.fmt(rel),
                        peak_mem_mb=bench_ops.fmt(peak), static_mem_mb=bench_ops.fmt(static),
                        loss=bench_ops.fmt(loss),
                    ))
                if args.csv:
                    bench_ops.append_csv(args.csv, rows, COLUMNS)
                all_rows += rows
    if args.csv and all_rows:
        print(f"appended {len(all_rows)} rows to {args.csv}")
    return all_rows


if __name__ == "__main__":
    main()
