"""Operator benchmark: MAB, FAB and MutexAttention per provider, side by side in one run.

Providers (`--providers`, comma list; default `auto`):
  reference    eager PyTorch (mutex_attn's reference backend): the baseline of every ratio
  compile      torch.compile(reference), static shapes
  compile-max  torch.compile(reference, mode="max-autotune-no-cudagraphs"); in `auto` on CUDA
               only (slow to compile: autotuning), on CPU when named
  native       the C++/CUDA extension
  triton       the Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1, where `auto`
               skips it because interpreter timings mean nothing — name it to run it anyway)
  floor        not the op: the op's minimal traffic (PASSES below) done by torch's own
               streaming kernels with no arithmetic (x.sum() for a pass that only reads,
               torch.add(a, b) / a.clone() for one that writes). Those kernels stream near the
               machine's memory bandwidth, so no implementation within SPEC §1's pass budget
               does much better: its "vs compile" is about the most any kernel could gain over
               torch.compile here, measured in the same run.
A provider that cannot run here is skipped with the reason printed; one that fails on a case
is reported (FAILED ...) and the run goes on.

Ops (`--ops`): mab (ma.mab(x, y)), fab (ma.FusionAttentionBlock(C), forward(am, y)) and
mutex_attention (ma.MutexAttention(C), FAB(MAB(x, y), y)). Every provider gets the same
parameters (seed 0); modules stay float32 for bfloat16 inputs, as under autocast.

Modes (`--modes`, or `all`): forward (inputs require grad, so the forward saves what the
backward needs), backward (the backward alone, a fresh forward untimed before each run),
full (forward + backward).

Shapes: `--shapes` takes ResNet-50 stage names (stem, layer1..layer4 = the outputs of the stem
and of each stage), `stages` (all five), `paper` (the five at --size plus layer1@512), and
`NAME@SIZE` for a stage at another image size, e.g. `layer1@512` = [N, 256, 128, 128]. Stage
shapes follow ResNet-50's arithmetic at each `--size` (comma list) for each `--batch` (comma
list). `--shape N,C,H,W` (repeatable) adds an explicit shape; given alone it replaces the
default stage.

Per row: median time with p20/p80 (ms; on CUDA from CUDA events, L2 flushed before each run),
speedup vs eager (reference) and vs compile, achieved GB/s of the minimal traffic and that as a
% of a copy (dst.copy_(src), read + write) of one tensor of the same size measured in the same
run (its fastest run: the machine's ceiling), peak memory (CUDA: max_memory_allocated during one
extra run minus what was allocated before it; CPU: not measured, NaN). The providers of an op
are timed interleaved, one run of each per round, so that load from elsewhere (a shared
machine) hits them alike and the ratios hold even when the absolute times move.

Minimal traffic = PASSES full-tensor passes over [N, C, H, W] (reads + writes, SPEC §1):
  mab              forward 3 (read x, y; write am)          backward 5 (read dam, x, y; write dx, dy)
  fab              forward 3 (read am, y; write out)        backward 5 (read dout, am, y; write dam, dy)
  mutex_attention  forward 5 (x, y read twice: stats, apply; write out)
                   backward 8 (dout, x, y read twice; write dx, dy)
  full = forward + backward. fab's counts take each tensor once, as if am and y (and dout) stayed
  in cache between the reduction (pooling; the gate's gradient) and the pass that uses it; a
  kernel that reads them twice does more passes and tops out below 100% of copy (forward: 3/5).

    python benchmarks/bench_ops.py --quick                  # < 1 min on the 2-core CPU
    python benchmarks/bench_ops.py --shapes stages --batch 4
    python benchmarks/bench_ops.py --shape 4,256,56,56 --reps 30 --providers reference,compile,native
    python benchmarks/bench_ops.py --device cuda --batch 16,32 --shapes paper \\
        --dtype float32,bfloat16 --layout contiguous,channels_last --modes all

Rows are appended to --csv (default benchmarks/results/ops.csv) after each shape, with device,
torch/triton versions, git commit, allocator settings; an existing file with older columns is
rewritten once with the new columns added (old rows keep blanks there).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import mutex_attn as ma
from mutex_attn.backends import unavailable_reason

# ResNet-50 stage outputs at 224 px: stem, layer1..4 as (C, H, W).
STAGES = {
    "stem": (64, 56, 56), "layer1": (256, 56, 56), "layer2": (512, 28, 28),
    "layer3": (1024, 14, 14), "layer4": (2048, 7, 7),
}
STAGE_STRIDE_STEPS = {"stem": 2, "layer1": 2, "layer2": 3, "layer3": 4, "layer4": 5}  # halvings
SHAPE_SETS = {"stages": list(STAGES), "paper": list(STAGES) + ["layer1@512"]}
OPS = ("mutex_attention", "mab", "fab")
MODES = ("forward", "backward", "full")
PROVIDERS = ("reference", "compile", "compile-max", "native", "triton", "floor")
COMPILE_MODES = {"compile": None, "compile-max": "max-autotune-no-cudagraphs"}
# Minimal full-tensor passes (reads + writes of [N, C, H, W] tensors), SPEC §1; see the docstring.
PASSES = {
    ("mab", "forward"): 3, ("mab", "backward"): 5, ("mab", "full"): 8,
    ("fab", "forward"): 3, ("fab", "backward"): 5, ("fab", "full"): 8,
    ("mutex_attention", "forward"): 5, ("mutex_attention", "backward"): 8,
    ("mutex_attention", "full"): 13,
}
# The floor provider's passes: tensors read by a reduction, then outputs written from inputs
# (torch.add of two, clone of one); they add up to PASSES (tests/test_benchmarks.py checks).
FLOOR_TRAFFIC = {
    "mab": {"forward": ((), (("x", "y"),)), "backward": ((), (("dout", "x"), ("y",)))},
    "mutex_attention": {"forward": (("x", "y"), (("x", "y"),)),
                        "backward": (("dout", "x", "y"), (("dout", "x"), ("y",)))},
}
FLOOR_TRAFFIC["fab"] = FLOOR_TRAFFIC["mab"]  # (the Case's x is fab's am)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = ("contiguous", "channels_last")
# The first columns are those of the earlier CSV, in the same order.
COLUMNS = [
    "device", "torch", "commit", "op", "shape", "stage", "mode", "provider", "dtype", "layout",
    "median_ms", "p20_ms", "p80_ms", "speedup_vs_eager", "speedup_vs_compile", "gbps",
    "copy_gbps", "allocator",
    "pct_copy", "peak_mem_mb", "passes", "batch", "size", "reps", "threads", "device_type",
    "device_detail", "triton", "python", "git_dirty", "timestamp",
]
QUICK = dict(batch="2", shapes="layer1,layer4", reps=5, warmup=2, modes="full",
             dtype="float32", layout="contiguous")
NORMAL = dict(batch="4", shapes="layer1", reps=20, warmup=3, modes="full",
              dtype="float32", layout="contiguous")


# ------------------------------------------------------------------------------ metadata
def git_commit() -> str:
    """HEAD's short hash, or $MUTEX_ATTN_COMMIT: the GPU machine's copy of .git can be a stale
    snapshot of the tree it runs (seen: every result there said the session's first commit)."""
    if os.environ.get("MUTEX_ATTN_COMMIT"):
        return os.environ["MUTEX_ATTN_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_dirty() -> str:
    """'yes' when tracked files differ from the commit (the numbers are not the commit's)."""
    if os.environ.get("MUTEX_ATTN_COMMIT"):
        return "unknown"  # the stated commit, not git's: nothing to compare with
    try:
        out = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                      text=True, cwd=Path(__file__).parent, stderr=subprocess.DEVNULL)
        return "yes" if out.strip() else "no"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def allocator_settings() -> str:
    """The allocator tuning in effect: glibc malloc (it decides how often big CPU outputs
    page-fault) and the CUDA caching allocator's configuration."""
    keys = ("MALLOC_", "THP_MEM", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
    tuned = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(keys)]
    return " ".join(tuned) or "default"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def device_detail(device: torch.device) -> str:
    """The GPU's memory and compute capability, or the CPU's model name."""
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        return f"{prop.name}, {prop.total_memory / 2**30:.0f} GiB, sm_{prop.major}{prop.minor}, CUDA {torch.version.cuda}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metadata(device: torch.device) -> dict:
    """The columns every row of both benchmarks carries."""
    return dict(
        device=device_name(device), torch=torch.__version__, commit=git_commit(),
        allocator=allocator_settings(), threads=torch.get_num_threads(), device_type=device.type,
        device_detail=device_detail(device), triton=package_version("triton"),
        python=platform.python_version(), git_dirty=git_dirty(),
        timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
    )


def append_csv(path: str | Path, rows: list[dict], columns: list[str]) -> None:
    """Append rows; a file with other columns is rewritten once with the union of both."""
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_columns = list(reader.fieldnames or [])
            if old_columns != columns:
                merged = old_columns + [c for c in columns if c not in old_columns]
                old_rows = list(reader)
            else:
                merged = None
        if merged is not None:
            tmp = path.with_suffix(path.suffix + ".tmp")
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=merged, restval="")
                writer.writeheader()
                writer.writerows(old_rows)
            tmp.replace(path)
            columns = merged
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore").writerows(rows)
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def fmt(v: float, digits: int = 5) -> str:
    """`digits` significant digits (times of microseconds and of seconds alike), or nan."""
    return "nan" if v is None or math.isnan(v) else f"{v:.{digits}g}"


# ------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Times callables, `reps` runs each after `warmup` untimed ones; setup() runs untimed
    before each run. Several callables are timed interleaved (one run of each per round, the
    order rotating), so that a burst of load from elsewhere hits them all alike.

    CPU: perf_counter around each run, garbage collector off while timing.
    CUDA: CUDA events around each run (no host sync inside the timed part), and a 256 MB
    buffer zeroed before each run so that no run starts with its inputs in L2 (as
    triton.testing.do_bench does)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self, fn, reps: int, warmup: int = 3, setup=None) -> list[float]:
        return self.interleaved({"": (fn, setup)}, reps, warmup)[""]

    def interleaved(self, cases: dict, reps: int, warmup: int = 3) -> dict[str, list[float]]:
        """{name: (fn, setup or None)} -> {name: [ms per run]}."""
        for fn, setup in cases.values():
            for _ in range(warmup):
                if setup:
                    setup()
                fn()
        sync(self.device)
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        names = list(cases)
        times = {name: [] for name in names}
        events = []
        try:
            for r in range(reps):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    fn, setup = cases[name]
                    if setup:
                        setup()
                    if self.device.type == "cuda":
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        self.flush.zero_()
                        start.record()
                        fn()
                        end.record()
                        events.append((name, start, end))
                    else:
                        t0 = time.perf_counter()
                        fn()
                        times[name].append((time.perf_counter() - t0) * 1e3)
            sync(self.device)
            for name, start, end in events:
                times[name].append(start.elapsed_time(end))
        finally:
            if gc_was_enabled:
                gc.enable()
        return times


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """Median, p20, p80 (ms)."""
    times = sorted(times)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return statistics.median(times), q(0.2), q(0.8)


def peak_memory_mb(fn, setup, device: torch.device) -> float:
    """CUDA: the most memory one call of fn() allocates beyond what was allocated before it
    (after setup()). CPU: NaN (not measured: the caching/glibc allocators hide it)."""
    if device.type != "cuda":
        return float("nan")
    if setup:
        setup()
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth(numel: int, dtype: torch.dtype, device: torch.device, timer: Timer, reps: int) -> float:
    """GB/s of dst.copy_(src) for tensors of this size (read + write), from the fastest of the
    runs: the roofline is what the machine can do, and load from elsewhere only slows runs."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    best = min(timer(lambda: dst.copy_(src), max(reps, 20)))
    return 2 * src.numel() * src.element_size() / (best * 1e-3) / 1e9


# ------------------------------------------------------------------------------ cases
def stage_shape(name: str, size: int) -> tuple[int, int, int]:
    """(C, H, W) of a ResNet-50 stage's output for a size×size image: the 7×7/2 stem conv and
    the 3×3/2 max pool halve (rounding up), then layer2..4 halve once each."""
    if name not in STAGES:
        raise SystemExit(f"unknown stage {name!r}; choose from {', '.join(STAGES)}, "
                         f"{', '.join(SHAPE_SETS)}, or NAME@SIZE")
    hw = size
    for _ in range(STAGE_STRIDE_STEPS[name]):
        hw = (hw + 1) // 2
    return STAGES[name][0], hw, hw


def expand_shapes(shapes: str | None, batches: list[int], sizes: list[int],
                  explicit: list[str]) -> list[tuple[str, tuple[int, int, int, int]]]:
    """[(label, (N, C, H, W))] for the stage tokens, every batch and size, then --shape ones."""
    def tokens(spec):
        for tok in filter(None, (t.strip() for t in spec.split(","))):
            name, _, at = tok.partition("@")
            if name in SHAPE_SETS:
                for sub in SHAPE_SETS[name]:
                    yield from tokens(sub if "@" in sub or not at else f"{sub}@{at}")
            else:
                yield name, (int(at),) if at else tuple(sizes)

    out = []
    for n in batches:
        for name, at_sizes in (tokens(shapes) if shapes else []):
            for size in at_sizes:
                label = name if size == 224 else f"{name}@{size}"
                out.append((label, (n, *stage_shape(name, size))))
    for spec in explicit:
        try:
            shape = tuple(int(v) for v in spec.replace("x", ",").split(","))
        except ValueError:
            shape = ()
        if len(shape) != 4 or min(shape) < 1:
            raise SystemExit(f"--shape wants N,C,H,W (four positive integers); got {spec!r}")
        out.append(("custom", shape))
    seen, unique = set(), []
    for label, shape in out:
        if shape not in seen:
            seen.add(shape)
            unique.append((label, shape))
    return unique


def resolve_providers(requested: str, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(providers to run, {skipped provider: why})."""
    auto = requested.strip() == "auto"
    names = ["reference", "compile", "native", "triton", "floor"] if auto else [
        p.strip() for p in requested.split(",") if p.strip()]
    if auto and device.type == "cuda":
        names.insert(2, "compile-max")
    run, skipped = [], {}
    for name in names:
        if name not in PROVIDERS:
            raise SystemExit(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)} or auto")
        backend = "reference" if name in COMPILE_MODES or name == "floor" else name
        reason = unavailable_reason(backend, device)
        if reason is None and auto and name == "triton" and device.type == "cpu":
            reason = "on CPU it runs under Triton's interpreter, whose timings mean nothing (name it in --providers to run it anyway)"
        if reason is None:
            run.append(name)
        else:
            skipped[name] = reason
    return run, skipped


def make_fn(op: str, provider: str, channels: int, device: torch.device):
    """(callable (a, b) -> output, module or None) for the op on this provider."""
    backend = "reference" if provider in COMPILE_MODES else provider
    module = None
    if op == "mab":
        fn = lambda x, y: ma.mab(x, y, backend=backend)  # noqa: E731
    else:
        torch.manual_seed(0)  # every provider gets the same parameters
        cls = ma.MutexAttention if op == "mutex_attention" else ma.FusionAttentionBlock
        module = fn = cls(channels, backend=backend).to(device)
    if provider in COMPILE_MODES:  # static shapes: one graph per case, as a user would get
        kwargs = dict(dynamic=False)
        if COMPILE_MODES[provider]:
            kwargs["mode"] = COMPILE_MODES[provider]
        fn = torch.compile(fn, **kwargs)
    return fn, module


class Case:
    """One op on one provider: its inputs and the callables of the three modes."""

    def __init__(self, op, provider, shape, device, dtype, layout):
        fmt_ = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        torch.manual_seed(1)  # the same inputs for every provider
        gen = lambda: torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt_)  # noqa: E731
        self.x, self.y, self.dout = gen().requires_grad_(), gen().requires_grad_(), gen()
        self.op, self.floor = op, provider == "floor"
        self.fn, self.module = (None, None) if self.floor else make_fn(op, provider, shape[1], device)
        self.out = None

    def traffic(self, mode):
        """The floor provider: the passes of FLOOR_TRAFFIC[op][mode], nothing else."""
        t = {"x": self.x.detach(), "y": self.y.detach(), "dout": self.dout}
        reads, writes = FLOOR_TRAFFIC[self.op][mode]

        def run():
            for name in reads:
                t[name].sum()
            return [torch.add(t[a], t[b[0]]) if b else t[a].clone() for a, *b in writes]
        return run

    def clear(self):
        self.x.grad = self.y.grad = None
        if self.module is not None:
            self.module.zero_grad(set_to_none=True)

    def forward(self):
        self.fn(self.x, self.y)

    def full(self):
        self.fn(self.x, self.y).backward(self.dout)

    def fresh_graph(self):
        self.clear()
        self.out = self.fn(self.x, self.y)

    def backward(self):
        out, self.out = self.out, None
        out.backward(self.dout)

    def mode(self, mode):
        """(timed callable, untimed setup) of a mode."""
        if self.floor:
            forward, backward = self.traffic("forward"), self.traffic("backward")
            return {"forward": forward, "backward": backward,
                    "full": lambda: (forward(), backward())}[mode], None
        return {"forward": (self.forward, None), "full": (self.full, self.clear),
                "backward": (self.backward, self.fresh_graph)}[mode]


def failure(provider, what, err) -> str:
    msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return f"FAILED {provider} {what}: {type(err).__name__}: {msg}"


def bench_op(op, providers, shape, modes, device, dtype, layout, timer, reps, warmup):
    """{provider: {mode: (median, p20, p80, peak MB)}} for one op, the providers timed
    interleaved; a provider that fails is reported and left out."""
    what = f"{op} {'x'.join(map(str, shape))} {dtype_label(dtype)} {layout}"
    torch._dynamo.reset()  # a fresh compile cache per op and shape: no recompile limit
    cases = {}
    for provider in providers:
        try:
            case = Case(op, provider, shape, device, dtype, layout)
            for mode in modes:  # the first call compiles; a failing provider shows up here
                call, setup = case.mode(mode)
                if setup:
                    setup()
                call()
            cases[provider] = case
        except Exception as err:  # report and go on with the other providers
            print(failure(provider, what, err))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results = {p: {} for p in cases}
    for mode in modes:
        try:
            times = timer.interleaved({p: c.mode(mode) for p, c in cases.items()}, reps, warmup)
        except Exception as err:
            print(failure(",".join(cases), f"{what} {mode}", err))
            continue
        for provider, case in cases.items():
            med, p20, p80 = quantiles(times[provider])
            results[provider][mode] = (med, p20, p80, peak_memory_mb(*case.mode(mode), device))
    return results


def dtype_label(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


# ------------------------------------------------------------------------------ main
def split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads); 0 keeps torch's choice")
    p.add_argument("--ops", default="mutex_attention,mab,fab", help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--providers", default="auto", help=f"comma list of {', '.join(PROVIDERS)}, or auto")
    p.add_argument("--shapes", default=None, help="stage names / sets / NAME@SIZE, comma list (default layer1)")
    p.add_argument("--shape", action="append", default=[], metavar="N,C,H,W", help="an explicit shape (repeatable)")
    p.add_argument("--batch", default=None, help="comma list of batch sizes for stage shapes (default 4)")
    p.add_argument("--size", default="224", help="comma list of image sizes; stage shapes follow them")
    p.add_argument("--dtype", default=None, help=f"comma list of {', '.join(DTYPES)} (default float32)")
    p.add_argument("--layout", default=None, help="comma list of contiguous, channels_last (default contiguous)")
    p.add_argument("--modes", default=None, help="comma list of forward, backward, full, or all (default full)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per case (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3)")
    p.add_argument("--time-budget", type=float, default=0, metavar="S",
                   help="start no new op after S seconds (0: no limit); rows so far are kept")
    p.add_argument("--quick", action="store_true",
                   help="batch 2, layer1 and layer4, 5 reps, full mode, float32 NCHW (under a minute on 2 CPU cores)")
    p.add_argument("--csv", default=str(Path(__file__).parent / "results" / "ops.csv"),
                   help="append rows here ('' for none)")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else NORMAL
    for key, value in defaults.items():
        if getattr(args, key) is None and not (key == "shapes" and args.shape):
            setattr(args, key, value)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # a step killed by `timeout` keeps its lines
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    for key in ("recompile_limit", "cache_size_limit"):  # one graph per case, many cases
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(64, getattr(torch._dynamo.config, key)))

    ops = split(args.ops)
    modes = list(MODES) if args.modes == "all" else split(args.modes)
    dtypes, layouts = split(args.dtype), split(args.layout)
    for name, values, allowed in (("op", ops, OPS), ("mode", modes, MODES),
                                  ("dtype", dtypes, DTYPES), ("layout", layouts, LAYOUTS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"unknown {name} {bad}; choose from {', '.join(allowed)}")
    shapes = expand_shapes(args.shapes, [int(b) for b in split(args.batch)],
                           [int(s) for s in split(args.size)], args.shape)
    providers, skipped = resolve_providers(args.providers, device)
    meta = metadata(device)

    print(f"device: {meta['device']} [{meta['device_detail']}]; torch {meta['torch']}; "
          f"triton {meta['triton'] or '-'}; commit {meta['commit']}"
          f"{' (+local changes)' if meta['git_dirty'] == 'yes' else ''}; reps {args.reps}; "
          f"allocator: {meta['allocator']}")
    for name, reason in skipped.items():
        print(f"skipped provider {name}: {reason}")
    if device.type == "cpu":
        print("peak memory: not measured on CPU (NaN)")
    if not providers:
        print("no provider can run here")
        return []
    header = (f"{'op':15s} {'shape':15s} {'dtype':8s} {'layout':6s} {'mode':8s} {'provider':11s} "
              f"{'median ms':>9s} {'p20':>8s} {'p80':>8s} {'vs eager':>8s} {'vs comp':>8s} "
              f"{'GB/s':>7s} {'%copy':>5s} {'peak MB':>8s}")
    print(header)
    timer = Timer(device)
    all_rows, t_start, stopped = [], time.perf_counter(), []
    for label, shape in shapes:
        n, c, h, w = shape
        numel = n * c * h * w
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            elem = torch.empty((), dtype=dtype).element_size()
            bw = None
            for layout in layouts:
                rows = []
                for op in ops:
                    if args.time_budget and time.perf_counter() - t_start > args.time_budget:
                        stopped.append(f"{op} {'x'.join(map(str, shape))} {dtype_name} {layout}")
                        continue
                    if bw is None:
                        bw = copy_bandwidth(numel, dtype, device, timer, args.reps)
                    results = bench_op(op, providers, shape, modes, device, dtype, layout, timer,
                                       args.reps, args.warmup)
                    for mode in modes:
                        ref = results.get("reference", {}).get(mode)
                        comp = results.get("compile", {}).get(mode)
                        for provider, by_mode in results.items():
                            if mode not in by_mode:
                                continue
                            med, p20, p80, peak = by_mode[mode]
                            gbs = PASSES[(op, mode)] * numel * elem / (med * 1e-3) / 1e9
                            vs_eager = ref[0] / med if ref else float("nan")
                            vs_comp = comp[0] / med if comp else float("nan")
                            peak_s = "-" if math.isnan(peak) else f"{peak:.0f}"
                            print(f"{op:15s} {'x'.join(map(str, shape)):15s} {dtype_name:8s} "
                                  f"{'NHWC' if layout == 'channels_last' else 'NCHW':6s} {mode:8s} "
                                  f"{provider:11s} {med:9.3f} {p20:8.3f} {p80:8.3f} {vs_eager:7.2f}x "
                                  f"{vs_comp:7.2f}x {gbs:7.1f} {100 * gbs / bw:4.0f}% {peak_s:>8s}")
                            rows.append(dict(
                                meta, op=op, shape="x".join(map(str, shape)), stage=label, mode=mode,
                                provider=provider, dtype=dtype_name, layout=layout,
                                median_ms=fmt(med), p20_ms=fmt(p20), p80_ms=fmt(p80),
                                speedup_vs_eager=fmt(vs_eager, 4), speedup_vs_compile=fmt(vs_comp, 4),
                                gbps=fmt(gbs), copy_gbps=fmt(bw), pct_copy=fmt(100 * gbs / bw, 4),
                                peak_mem_mb=fmt(peak), passes=PASSES[(op, mode)], batch=n,
                                size="" if label == "custom" else (label.partition("@")[2] or 224),
                                reps=args.reps,
                            ))
                if rows:
                    print(f"{'':15s} copy bandwidth at {'x'.join(map(str, shape))} {dtype_name}: {bw:.1f} GB/s")
                if args.csv:
                    append_csv(args.csv, rows, COLUMNS)
                all_rows += rows
    if stopped:
        print(f"time budget of {args.time_budget:.0f} s reached; {len(stopped)} op cases not run, "
              f"from {stopped[0]} on")
    if args.csv and all_rows:
        print(f"appended {len(all_rows)} rows to {args.csv}")
    return all_rows


if __name__ == "__main__":
    main()
