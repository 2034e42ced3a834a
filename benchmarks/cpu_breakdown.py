"""Where the native MutexAttention step's time goes on the CPU, next to torch.compile and the
memory floor, in one interleaved run: the evidence behind the CPU speed goal's status
(benchmarks/RESULTS.md).

Per forward + backward step (median ms over --reps rounds, each round one run of each, the
order rotating, so that load from elsewhere hits them alike):
  compile      torch.compile of the reference block
  native       the native block (wall time)
  row kernels  of that, the time inside its four fused ops (K1 stats, K2 apply, K3 backward
               stats, K4 backward apply; timed in a separate traced run of the same step)
  around       native minus row kernels: the gate network, autograd, allocation, Python
  floor        bench_ops' floor provider: SPEC §1's 13 passes by torch's own streaming kernels,
               no arithmetic

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        python benchmarks/cpu_breakdown.py --shape 4,256,56,56 --reps 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import bench_ops  # noqa: E402

KERNELS = {"mutex_attention_stats": "K1", "mutex_attention_apply": "K2",
           "mutex_attention_backward_stats": "K3", "mutex_attention_backward_apply": "K4"}


class KernelTimer(TorchDispatchMode):
    """Adds up the wall time of each mutex_attn op called under it (CPU: synchronous)."""

    def __init__(self):
        super().__init__()
        self.ms = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "mutex_attn":
            return func(*args, **(kwargs or {}))
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.ms[KERNELS.get(func._opname, func._opname)] += (time.perf_counter() - t0) * 1e3
        return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4,256,56,56", help="N,C,H,W")
    p.add_argument("--layout", default="contiguous", choices=bench_ops.LAYOUTS)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    device = torch.device("cpu")
    if "native" not in bench_ops.resolve_providers("native", device)[0]:
        raise SystemExit("the native extension is not built here")

    cases = {name: bench_ops.Case("mutex_attention", name, shape, device, torch.float32, args.layout)
             for name in ("compile", "native", "floor")}
    steps = {name: case.mode("full") for name, case in cases.items()}
    traced = KernelTimer()

    def native_traced():
        with traced:
            steps["native"][0]()
    steps["traced"] = (native_traced, cases["native"].clear)

    for fn, setup in steps.values():  # warm-up (compiles)
        for _ in range(3):
            if setup:
                setup()
            fn()
    traced.ms.clear()
    times, kernel_ms = defaultdict(list), defaultdict(list)
    names = list(steps)
    for r in range(args.reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, setup = steps[name]
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
            if name == "traced":
                for k, v in traced.ms.items():
                    kernel_ms[k].append(v)
                traced.ms.clear()

    med = {name: statistics.median(v) for name, v in times.items()}
    per_kernel = {k: statistics.median(v) for k, v in sorted(kernel_ms.items())}
    kernels = statistics.median([sum(vals) for vals in zip(*kernel_ms.values())])
    around = med["native"] - kernels
    print(f"MutexAttention forward+backward, {'x'.join(map(str, shape))} float32 {args.layout}, "
          f"{args.threads} threads, {args.reps} rounds, commit {bench_ops.git_commit()}, "
          f"allocator: {bench_ops.allocator_settings()} (median ms)")
    print(f"  compile           {med['compile']:7.2f}")
    print(f"  native            {med['native']:7.2f}   = row kernels {kernels:.2f} "
          f"({', '.join(f'{k} {v:.2f}' for k, v in per_kernel.items())}) + around them {around:.2f}")
    print(f"  floor (13 passes) {med['floor']:7.2f}")
    print(f"  native vs compile {med['compile'] / med['native']:.2f}x; floor vs compile "
          f"{med['compile'] / med['floor']:.2f}x (no kernel within SPEC's passes gets past it); "
          f"row kernels / floor {kernels / med['floor']:.2f}")
    return dict(med, kernels=kernels, around=around, **per_kernel)


if __name__ == "__main__":
    main()
