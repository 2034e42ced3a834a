"""Smoke tests of the benchmark scripts: they run with the tiniest settings, write CSV rows with
the expected columns and sensible numbers, and plot.py draws PNGs from them."""
from __future__ import annotations

import csv
import importlib.util
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mutex_attn as ma

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_ops  # noqa: E402
import bench_train_step  # noqa: E402

_spec = importlib.util.spec_from_file_location("benchmarks_plot", BENCH / "plot.py")
plot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot)

NATIVE = "native" in ma.available_backends("cpu")
PROVIDERS = "reference,native,floor" if NATIVE else "reference,floor"
KEEP_THREADS = ["--threads", "1"]  # one thread: no stalls on a shared machine (restored below)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def ops_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "ops.csv"
    returned = bench_ops.main(["--shape", "2,16,8,8", "--ops", "mutex_attention,mab,fab",
                               "--providers", PROVIDERS, "--modes", "all", "--reps", "3",
                               "--warmup", "1", "--csv", str(path), *KEEP_THREADS])
    return path, returned


@pytest.fixture(scope="module")
def train_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "train_step.csv"
    backends = "reference,native" if NATIVE else "reference"
    returned = bench_train_step.main(["--size", "32", "--batch", "2", "--steps", "2", "--warmup", "1",
                                      "--backends", backends, "--no-compile", "--amp", "none",
                                      "--layout", "contiguous", "--csv", str(path), *KEEP_THREADS])
    return path, returned


def test_bench_ops_writes_one_row_per_case(ops_csv):
    path, returned = ops_csv
    header, rows = read_rows(path)
    assert set(bench_ops.COLUMNS) <= set(header)
    assert header[:18] == bench_ops.COLUMNS[:18]  # the earlier CSV's columns, in their order
    n_providers = len(PROVIDERS.split(","))
    assert len(rows) == len(returned) == 3 * 3 * n_providers  # ops × modes × providers
    seen = {(r["op"], r["mode"], r["provider"]) for r in rows}
    assert len(seen) == len(rows)
    for r in rows:
        med, p20, p80 = float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= med <= p80
        assert r["shape"] == "2x16x8x8" and r["stage"] == "custom" and r["batch"] == "2"
        assert int(r["passes"]) == bench_ops.PASSES[(r["op"], r["mode"])]
        bytes_moved = int(r["passes"]) * 2 * 16 * 8 * 8 * 4
        assert float(r["gbps"]) == pytest.approx(bytes_moved / (med * 1e-3) / 1e9, rel=1e-3)
        assert float(r["pct_copy"]) == pytest.approx(100 * float(r["gbps"]) / float(r["copy_gbps"]), rel=1e-2)
        assert math.isnan(float(r["peak_mem_mb"]))  # not measured on CPU
        assert math.isnan(float(r["speedup_vs_compile"]))  # no compile provider in this run
        assert r["device_type"] == "cpu" and r["torch"] == torch.__version__ and r["commit"]
        if r["provider"] == "reference":
            assert float(r["speedup_vs_eager"]) == 1.0
        else:
            ref = next(x for x in rows if x["provider"] == "reference" and x["op"] == r["op"] and x["mode"] == r["mode"])
            assert float(r["speedup_vs_eager"]) == pytest.approx(float(ref["median_ms"]) / med, rel=1e-2)


def test_floor_provider_moves_exactly_the_minimal_passes():
    for (op, mode), passes in bench_ops.PASSES.items():
        parts = ["forward", "backward"] if mode == "full" else [mode]
        moved = 0
        for part in parts:
            reads, writes = bench_ops.FLOOR_TRAFFIC[op][part]
            moved += len(reads) + sum(len(w) + 1 for w in writes)  # inputs read + one output
        assert moved == passes, (op, mode)
    case = bench_ops.Case("mutex_attention", "floor", (2, 8, 4, 4), torch.device("cpu"),
                          torch.float32, "channels_last")
    dx, dy = case.traffic("backward")()
    torch.testing.assert_close(dx, case.dout + case.x.detach(), rtol=0, atol=0)
    torch.testing.assert_close(dy, case.y.detach(), rtol=0, atol=0)
    assert dy.data_ptr() != case.y.data_ptr()  # written, not aliased
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in (dx, dy))
    full, setup = case.mode("full")
    assert setup is None and len(full()[0]) == 1  # forward's one output, then backward's two


@pytest.mark.skipif(not NATIVE, reason="the native extension is not built")
def test_cpu_breakdown_splits_native_into_kernels_and_the_rest(capsys):
    import cpu_breakdown
    got = cpu_breakdown.main(["--shape", "2,8,6,6", "--reps", "3", *KEEP_THREADS])
    assert {"compile", "native", "floor", "kernels", "around", "K1", "K2", "K3", "K4"} <= set(got)
    assert all(got[k] > 0 for k in ("compile", "native", "floor", "K1", "K2", "K3", "K4"))
    assert got["kernels"] < got["native"]  # four row kernels of a tiny shape inside a whole step
    assert got["around"] == pytest.approx(got["native"] - got["kernels"])
    assert "floor vs compile" in capsys.readouterr().out


def test_bench_ops_compile_provider_and_layouts(tmp_path):
    path = tmp_path / "ops.csv"
    rows = bench_ops.main(["--shape", "2,8,4,4", "--ops", "mab", "--providers", "reference,compile",
                           "--dtype", "float32,bfloat16", "--layout", "contiguous,channels_last",
                           "--reps", "2", "--warmup", "1", "--csv", str(path), *KEEP_THREADS])
    _, written = read_rows(path)
    assert len(rows) == len(written) == 2 * 2 * 2
    assert {(r["dtype"], r["layout"]) for r in written} == {
        (d, l) for d in ("float32", "bfloat16") for l in ("contiguous", "channels_last")}
    for r in written:
        if r["provider"] == "compile":
            assert float(r["speedup_vs_compile"]) == 1.0 and float(r["speedup_vs_eager"]) > 0
        bytes_per = 2 if r["dtype"] == "bfloat16" else 4
        assert float(r["gbps"]) == pytest.approx(8 * 2 * 8 * 16 * bytes_per / (float(r["median_ms"]) * 1e-3) / 1e9, rel=1e-3)


def test_stage_shapes_follow_resnet50():
    both_batches = bench_ops.expand_shapes("stages", [16, 32], [224], [])
    assert len(both_batches) == 10 and both_batches[0] == ("stem", (16, 64, 56, 56))
    got = [s for _, s in bench_ops.expand_shapes("stages", [32], [224], [])]
    assert got == [(32, *chw) for chw in bench_ops.STAGES.values()]
    assert bench_ops.expand_shapes("layer1@512", [4], [224], []) == [("layer1@512", (4, 256, 128, 128))]
    assert bench_ops.expand_shapes("layer4", [1], [112], []) == [("layer4@112", (1, 2048, 4, 4))]
    paper = bench_ops.expand_shapes("paper", [2], [224], [])
    assert [label for label, _ in paper] == [*bench_ops.STAGES, "layer1@512"]
    both = bench_ops.expand_shapes("layer1", [2], [224], ["3,5,7,9", "1x2x3x4"])
    assert both == [("layer1", (2, 256, 56, 56)), ("custom", (3, 5, 7, 9)), ("custom", (1, 2, 3, 4))]
    with pytest.raises(SystemExit):
        bench_ops.expand_shapes(None, [2], [224], ["3,5,7"])
    with pytest.raises(SystemExit):
        bench_ops.expand_shapes("layer9", [2], [224], [])


def test_quick_and_explicit_shape_defaults():
    quick = bench_ops.parse_args(["--quick"])
    assert (quick.batch, quick.shapes, quick.reps, quick.modes) == ("2", "layer1,layer4", 5, "full")
    assert bench_ops.parse_args([]).shapes == "layer1"
    assert bench_ops.parse_args(["--shape", "2,3,4,5"]).shapes is None  # the explicit shape alone


def test_providers_skip_with_a_reason():
    run, skipped = bench_ops.resolve_providers("auto", torch.device("cpu"))
    assert run[:2] == ["reference", "compile"] and "compile-max" not in run + list(skipped)
    assert "triton" in skipped and skipped["triton"]
    assert ("native" in run) == NATIVE and run[-1] == "floor"
    run, _ = bench_ops.resolve_providers("reference,compile-max", torch.device("cpu"))
    assert run == ["reference", "compile-max"]
    with pytest.raises(SystemExit):
        bench_ops.resolve_providers("reference,bogus", torch.device("cpu"))


def test_append_csv_adds_new_columns_to_an_old_file(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("device,op,median_ms\ncpu,mab,1.5\n")
    bench_ops.append_csv(path, [{"device": "cpu", "op": "fab", "median_ms": "2.0", "peak_mem_mb": "nan"}],
                         ["device", "op", "median_ms", "peak_mem_mb"])
    header, rows = read_rows(path)
    assert header == ["device", "op", "median_ms", "peak_mem_mb"]
    assert [r["op"] for r in rows] == ["mab", "fab"] and rows[0]["peak_mem_mb"] == ""
    bench_ops.append_csv(path, [{"device": "cpu", "op": "mab", "median_ms": "1.0", "peak_mem_mb": "3"}],
                         ["device", "op", "median_ms", "peak_mem_mb"])
    assert len(read_rows(path)[1]) == 3


def test_bench_train_step_writes_rows(train_csv):
    path, returned = train_csv
    header, rows = read_rows(path)
    assert set(bench_train_step.COLUMNS) <= set(header)
    models = [(r["model"], r["backend"]) for r in rows]
    expected = [("manet_resnet50", "reference")] + ([("manet_resnet50", "native")] if NATIVE else [])
    assert models == expected + [("resnet50", "-")] and len(returned) == len(rows)
    for r in rows:
        med = float(r["median_ms"])
        assert med > 0 and float(r["images_per_s"]) == pytest.approx(2 / (med * 1e-3), rel=1e-3)
        assert math.isfinite(float(r["loss"])) and float(r["first_step_s"]) > 0
        assert math.isnan(float(r["peak_mem_mb"]))  # not measured on CPU
        assert (r["compiled"], r["amp"], r["layout"], r["batch"], r["size"]) == ("eager", "none", "contiguous", "2", "32")
    ref = rows[0]
    assert float(ref["speedup_vs_eager_reference"]) == 1.0
    assert rows[-1]["images_counted"] != ref["images_counted"]  # main path vs one path
    assert float(rows[-1]["rel_to_resnet50"]) == 1.0


def test_plot_writes_pngs_and_summary(ops_csv, train_csv, tmp_path):
    out = tmp_path / "plots"
    written = plot.main(["--ops-csv", str(ops_csv[0]), "--train-csv", str(train_csv[0]),
                         "--out", str(out), "--summary"])
    names = sorted(p.name for p in written)
    # ops: speedup + roofline per mode (forward, backward, full); train: one per device/batch/size
    assert len([n for n in names if n.startswith("ops_speedup_")]) == 3
    assert len([n for n in names if n.startswith("ops_roofline_")]) == 3
    assert len([n for n in names if n.startswith("train_step_")]) == 1
    for p in written:
        assert p.exists() and p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
    summary = (out / "summary.md").read_text()
    assert "| mutex_attention | 2x16x8x8 |" in summary and "manet_resnet50" in summary
    # filters: one mode only, and nothing for an unknown device
    only_full = plot.main(["--ops-csv", str(ops_csv[0]), "--train-csv", str(tmp_path / "none.csv"),
                           "--out", str(tmp_path / "full"), "--mode", "full"])
    assert len(only_full) == 2
    assert plot.main(["--ops-csv", str(ops_csv[0]), "--train-csv", str(train_csv[0]),
                      "--out", str(tmp_path / "x"), "--device", "no-such-device"]) == []


def test_plot_selects_the_latest_commit_per_device():
    rows = [
        dict(device="A", commit="old", op="mab", shape="s", mode="full", provider="native", dtype="f", layout="c", median_ms="3"),
        dict(device="A", commit="new", op="mab", shape="s", mode="full", provider="native", dtype="f", layout="c", median_ms="2"),
        dict(device="B", commit="old", op="mab", shape="s", mode="full", provider="native", dtype="f", layout="c", median_ms="5"),
        dict(device="A", commit="new", op="mab", shape="s", mode="full", provider="native", dtype="f", layout="c", median_ms="1"),
    ]
    got = plot.select(rows, plot.OPS_KEY)
    assert sorted((r["device"], r["commit"], r["median_ms"]) for r in got) == [("A", "new", "1"), ("B", "old", "5")]
    assert len(plot.select(rows, plot.OPS_KEY, commit="all")) == 2  # duplicates: the last one wins
    assert [r["device"] for r in plot.select(rows, plot.OPS_KEY, commit="old")] == ["A", "B"]


def test_bench_ops_runs_as_a_script(tmp_path):
    path = tmp_path / "ops.csv"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_ops.py"), "--shape", "2,8,4,4", "--ops", "mab",
         "--providers", "reference", "--reps", "1", "--warmup", "0", "--threads", "1", "--csv", str(path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mab" in proc.stdout and len(read_rows(path)[1]) == 1


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar")
def test_gpu_check_dry_run_packs_its_results(tmp_path):
    """The GPU script's plumbing, rehearsed on CPU (GPU_CHECK_DRY_RUN=1): a device call is too
    scarce to find a shell mistake there. Everything lands in the archive, the few files to read
    beside it, every step says ok."""
    import os
    import tarfile

    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", GPU_CHECK_STEPS="tests,ops,profile", GPU_CHECK_OPS="mab",
               GPU_CHECK_PYTEST="-k gpu_backends_are_built", GPU_CHECK_COMMIT="test123",
               PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = (tmp_path / "steps.txt").read_text()
    for name in ("GPU tests", "ops float32 contiguous", "ops bfloat16 channels_last", "profile", "plots"):
        assert f"{name}: ok" in steps, steps
    with tarfile.open(tmp_path / "gpu_results.tar.gz") as archive:
        names = {Path(n).name for n in archive.getnames()}
    assert {"ops.csv", "profile.txt", "env.txt", "cuda-tests.log", "summary.md"} <= names
    assert {p.name for p in tmp_path.iterdir()} <= {"gpu_results.tar.gz", "steps.txt", "cuda-tests.log",
                                                   "ops.csv", "train_step.csv", "profile.txt", "summary.md"}
    assert "test123" in (tmp_path / "ops.csv").read_text()


def test_a_failing_provider_is_reported_and_left_out(tmp_path, monkeypatch, capsys):
    make_fn = bench_ops.make_fn

    def broken(op, provider, channels, device):
        if provider == "compile":
            raise RuntimeError("no compiler today")
        return make_fn(op, provider, channels, device)

    monkeypatch.setattr(bench_ops, "make_fn", broken)
    rows = bench_ops.main(["--shape", "2,8,4,4", "--ops", "mab", "--providers", "reference,compile",
                           "--reps", "2", "--warmup", "0", "--csv", str(tmp_path / "ops.csv"), *KEEP_THREADS])
    assert [r["provider"] for r in rows] == ["reference"]
    assert math.isnan(float(rows[0]["speedup_vs_compile"]))
    assert "FAILED compile mab 2x8x4x4 float32 contiguous: RuntimeError: no compiler today" in capsys.readouterr().out


def test_timer_interleaves_and_counts_runs():
    calls = []
    timer = bench_ops.Timer(torch.device("cpu"))
    times = timer.interleaved({"a": (lambda: calls.append("a"), None),
                               "b": (lambda: calls.append("b"), lambda: calls.append("setup b"))}, reps=3, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)
    assert calls == ["a", "setup b", "b",                     # warm-up
                     "a", "setup b", "b", "setup b", "b", "a", "a", "setup b", "b"]  # rounds, rotating


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_row_kernels_bench_builds_and_runs(tmp_path):
    """The stand-alone row-kernel timer compiles against csrc/cpu/row_kernels.h as it is and
    reports a finite time for each of the four fused-path kernels."""
    exe = tmp_path / "row_kernels_bench"
    subprocess.run(["g++", "-O1", "-std=c++17", "-fopenmp", "-ffp-contract=off", f"-I{ROOT / 'csrc'}",
                    str(BENCH / "row_kernels_bench.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe), "49", "6", "2"], check=True, capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("K")]
    assert [r[0] for r in rows] == ["K1", "K2", "K3", "K4"]
    assert all(math.isfinite(float(r[-3])) and float(r[-3]) >= 0 for r in rows)
    checksum = next(line for line in out.splitlines() if line.startswith("checksum"))
    assert math.isfinite(float(checksum.split()[1]))  # the kernels' outputs are finite
    assert subprocess.run([str(exe), "0"], capture_output=True).returncode == 2
