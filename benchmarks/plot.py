"""Plots (and a markdown summary) of the benchmark CSVs written by bench_ops.py and
bench_train_step.py.

For each device × dtype × layout × mode in ops.csv:
  ops_speedup_<device>_<dtype>_<layout>_<mode>.png   grouped bars per shape, one bar per
      provider: speedup vs eager (left column) and vs torch.compile (right), one row per op;
  ops_roofline_<device>_<dtype>_<layout>_<mode>.png  achieved bandwidth of the minimal traffic
      as a % of the copy bandwidth measured in the same run, per shape and provider.
For each device in train_step.csv (when the file exists):
  train_step_<device>.png   images/s (main-path images) per configuration, and step time
      relative to the eager reference backend.

Rows: by default the latest commit's rows per device (the commit of the device's last row in
the file, after the other filters); --commit HASH or --commit all for others. Where a case was
measured more than once, the last row wins. Filters take comma lists; --device matches a
substring of the device name (case-insensitive).

    python benchmarks/plot.py                                  # benchmarks/results/*.png
    python benchmarks/plot.py --dtype bfloat16 --layout channels_last --out /tmp/plots
    python benchmarks/plot.py --summary --no-png               # markdown tables only

Uses matplotlib's object API (matplotlib.figure.Figure), no pyplot state.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OPS_KEY = ("device", "op", "shape", "mode", "provider", "dtype", "layout")
TRAIN_KEY = ("device", "model", "backend", "compiled", "amp", "layout", "batch", "size")
# floor = bench_ops' memory-traffic floor (not an implementation): the bar no kernel passes.
PROVIDER_ORDER = ("reference", "compile", "compile-max", "native", "triton", "floor")
COLORS = {"reference": "#7f7f7f", "compile": "#1f77b4", "compile-max": "#17becf",
          "native": "#d62728", "triton": "#2ca02c", "floor": "#c7c7c7", "-": "#9467bd"}


def read_csv(path) -> list[dict]:
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def select(rows: list[dict], key: tuple, device=None, commit="latest", **filters) -> list[dict]:
    """Rows passing the filters, restricted to a commit per device, the last of duplicates."""
    wanted = {k: split(v) for k, v in filters.items() if v}
    devices = split(device)
    out = []
    for row in rows:
        if devices and not any(d.lower() in row.get("device", "").lower() for d in devices):
            continue
        if any(row.get(k) not in v for k, v in wanted.items()):
            continue
        out.append(row)
    if commit == "latest":
        last = {}
        for row in out:
            last[row.get("device")] = row.get("commit")
        out = [r for r in out if r.get("commit") == last[r.get("device")]]
    elif commit and commit != "all":
        commits = split(commit)
        out = [r for r in out if any(r.get("commit", "").startswith(c) for c in commits)]
    unique = {}
    for row in out:
        unique.pop(tuple(row.get(k) for k in key), None)
        unique[tuple(row.get(k) for k in key)] = row  # the last one, in file order
    return list(unique.values())


def slug(*parts) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", str(p)).strip("-") for p in parts)


def ordered(values, order=()) -> list:
    seen = list(dict.fromkeys(values))
    return sorted(seen, key=lambda v: (order.index(v) if v in order else len(order), seen.index(v)))


def groups(rows: list[dict], keys: tuple) -> dict:
    out: dict = {}
    for row in rows:
        out.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    return out


def shape_label(row: dict) -> str:
    stage = row.get("stage") or ""
    return f"{stage}\n{row['shape']}" if stage and stage != "custom" else row["shape"]


def bar_panel(ax, rows: list[dict], value: str, providers: list[str], title: str, ylabel: str,
              ref_line: float | None) -> None:
    """Grouped bars: one group per shape, one bar per provider."""
    shapes = ordered(shape_label(r) for r in rows)
    by = {(shape_label(r), r["provider"]): num(r.get(value)) for r in rows}
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(shapes))]
        vals = [by.get((s, provider), math.nan) for s in shapes]
        bars = ax.bar(xs, [0 if math.isnan(v) else v for v in vals], width,
                      label=provider, color=COLORS.get(provider))
        for bar, v in zip(bars, vals):
            if not math.isnan(v):
                ax.annotate(f"{v:.2f}" if v < 10 else f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v),
                            ha="center", va="bottom", fontsize=6)
    if ref_line is not None:
        ax.axhline(ref_line, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7)


def plot_ops(rows: list[dict], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    written = []
    for (device, dtype, layout, mode), grp in groups(rows, ("device", "dtype", "layout", "mode")).items():
        ops = ordered((r["op"] for r in grp), ("mutex_attention", "mab", "fab"))
        providers = ordered((r["provider"] for r in grp), PROVIDER_ORDER)
        commit = ",".join(ordered(r.get("commit", "") for r in grp))
        what = f"{device} · {dtype} · {layout} · {mode} · commit {commit}"
        fig = Figure(figsize=(12, 3.2 * len(ops)), layout="constrained")
        axes = fig.subplots(len(ops), 2, squeeze=False)
        for i, op in enumerate(ops):
            op_rows = [r for r in grp if r["op"] == op]
            bar_panel(axes[i][0], op_rows, "speedup_vs_eager", [p for p in providers if p != "reference"],
                      f"{op}: speedup vs eager", "× eager", 1.0)
            bar_panel(axes[i][1], op_rows, "speedup_vs_compile", [p for p in providers if p != "compile"],
                      f"{op}: speedup vs torch.compile", "× compile", 1.0)
        fig.suptitle(what, fontsize=10)
        path = out / f"ops_speedup_{slug(device, dtype, layout, mode)}.png"
        fig.savefig(path, dpi=110)
        written.append(path)

        fig = Figure(figsize=(12, 3.2 * len(ops)), layout="constrained")
        axes = fig.subplots(len(ops), 1, squeeze=False)
        for i, op in enumerate(ops):
            bar_panel(axes[i][0], [r for r in grp if r["op"] == op], "pct_copy", providers,
                      f"{op}: minimal traffic as % of copy bandwidth", "% of copy", 100.0)
        fig.suptitle(what, fontsize=10)
        path = out / f"ops_roofline_{slug(device, dtype, layout, mode)}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def train_label(r: dict) -> str:
    model = "ResNet-50" if r["model"] == "resnet50" else f"MA-Net {r['backend']}"
    return f"{model} · {r['compiled']} · {r['amp']} · {'NHWC' if r['layout'] == 'channels_last' else 'NCHW'}"


def plot_train(rows: list[dict], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    written = []
    for (device, batch, size), grp in groups(rows, ("device", "batch", "size")).items():
        labels = [train_label(r) for r in grp]
        fig = Figure(figsize=(12, 1.2 + 0.3 * len(grp)), layout="constrained")
        ax_ips, ax_rel = fig.subplots(1, 2, sharey=True)
        ys = range(len(grp))
        colors = [COLORS.get(r["backend"], "#9467bd") for r in grp]
        ips = [num(r["images_per_s"]) for r in grp]
        ax_ips.barh(ys, [0 if math.isnan(v) else v for v in ips], color=colors)
        for y, v in zip(ys, ips):
            ax_ips.annotate(f"{v:.1f}", (v, y), va="center", fontsize=7)
        ax_ips.set_yticks(list(ys))
        ax_ips.set_yticklabels(labels, fontsize=7)
        ax_ips.invert_yaxis()
        ax_ips.set_xlabel("images/s (main-path images)", fontsize=8)
        rel = [num(r["speedup_vs_eager_reference"]) for r in grp]
        ax_rel.barh(ys, [0 if math.isnan(v) else v for v in rel], color=colors)
        ax_rel.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax_rel.set_xlabel("speedup vs eager reference backend (MA-Net rows)", fontsize=8)
        fig.suptitle(f"training step · {device} · batch {batch} · {size} px · "
                     f"commit {','.join(ordered(r.get('commit', '') for r in grp))}", fontsize=10)
        path = out / f"train_step_{slug(device, f'b{batch}', f'{size}px')}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def fmt_ms(v: float) -> str:
    return "-" if math.isnan(v) else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def fmt_x(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}×"


def summary_ops(rows: list[dict]) -> str:
    """Markdown: per device/dtype/layout/mode, median ms per provider and the speedups of the
    non-baseline providers vs eager and vs compile."""
    lines = []
    for (device, dtype, layout, mode), grp in groups(rows, ("device", "dtype", "layout", "mode")).items():
        providers = ordered((r["provider"] for r in grp), PROVIDER_ORDER)
        others = [p for p in providers if p not in ("reference", "compile")]
        lines += ["", f"**{device}, {dtype}, {layout}, {mode}** (median ms; "
                      f"commit {','.join(ordered(r.get('commit', '') for r in grp))})", ""]
        head = ["op", "shape", *providers]
        for p in others:
            head += [f"{p} vs eager", f"{p} vs compile"]
        head.append("best %copy")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
        by = {(r["op"], r["shape"], r["provider"]): r for r in grp}
        cases = ordered(((r["op"], r["shape"]) for r in grp))
        cases.sort(key=lambda c: ("mutex_attention", "mab", "fab").index(c[0]) if c[0] in ("mutex_attention", "mab", "fab") else 9)
        for op, shape in cases:
            cells = [op, shape]
            cells += [fmt_ms(num(by.get((op, shape, p), {}).get("median_ms"))) for p in providers]
            for p in others:
                r = by.get((op, shape, p), {})
                cells += [fmt_x(num(r.get("speedup_vs_eager"))), fmt_x(num(r.get("speedup_vs_compile")))]
            pct = [num(by[(op, shape, p)].get("pct_copy")) for p in providers
                   if (op, shape, p) in by and p != "floor"]
            pct = [v for v in pct if not math.isnan(v)]
            cells.append(f"{max(pct):.0f}%" if pct else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_train(rows: list[dict]) -> str:
    lines = []
    for (device, batch, size), grp in groups(rows, ("device", "batch", "size")).items():
        lines += ["", f"**training step, {device}, batch {batch}, {size} px** "
                      f"(images/s counts main-path images; commit "
                      f"{','.join(ordered(r.get('commit', '') for r in grp))})", "",
                  "| model | backend | mode | amp | layout | median ms | images/s | vs eager ref | "
                  "/ResNet-50 | peak MB |", "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in grp:
            peak = num(r.get("peak_mem_mb"))
            lines.append(
                f"| {r['model']} | {r['backend']} | {r['compiled']} | {r['amp']} | {r['layout']} | "
                f"{fmt_ms(num(r['median_ms']))} | {num(r['images_per_s']):.1f} | "
                f"{fmt_x(num(r.get('speedup_vs_eager_reference')))} | {fmt_x(num(r.get('rel_to_resnet50')))} | "
                f"{'-' if math.isnan(peak) else f'{peak:.0f}'} |")
    return "\n".join(lines)


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops-csv", default=str(RESULTS / "ops.csv"))
    p.add_argument("--train-csv", default=str(RESULTS / "train_step.csv"))
    p.add_argument("--out", default=str(RESULTS), help="folder for the PNGs (and summary.md)")
    p.add_argument("--device", help="substring(s) of the device name, comma list")
    p.add_argument("--dtype")
    p.add_argument("--layout")
    p.add_argument("--op")
    p.add_argument("--mode")
    p.add_argument("--provider")
    p.add_argument("--commit", default="latest", help="latest (per device), all, or commit hash(es)")
    p.add_argument("--summary", action="store_true", help="print markdown tables and write <out>/summary.md")
    p.add_argument("--no-png", action="store_true", help="no plots (with --summary: tables only)")
    args = p.parse_args(argv)

    ops_rows = select(read_csv(args.ops_csv), OPS_KEY, args.device, args.commit, dtype=args.dtype,
                      layout=args.layout, op=args.op, mode=args.mode, provider=args.provider)
    train_rows = select(read_csv(args.train_csv), TRAIN_KEY, args.device, args.commit,
                        amp=None, layout=args.layout)
    if not ops_rows and not train_rows:
        print(f"no rows to plot in {args.ops_csv} or {args.train_csv} with these filters", file=sys.stderr)
        return []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if not args.no_png:
        written += plot_ops(ops_rows, out) + plot_train(train_rows, out)
        for path in written:
            print(f"wrote {path}")
    if args.summary:
        text = (summary_ops(ops_rows) + "\n" + summary_train(train_rows)).strip() + "\n"
        (out / "summary.md").write_text(text)
        print(text)
    return written


if __name__ == "__main__":
    main()
