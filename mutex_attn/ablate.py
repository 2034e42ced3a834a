"""`mutex-attn ablate`: the paper's ablations on any dataset, one table out.

    loss   (Table 7): L_CE only / L_CE + L_CS 1:1 / adaptive weights      (blocks MAB + FAB)
    blocks (Table 8): no attention / MAB / MAB + FAB                      (adaptive loss)

The full model (MAB + FAB, adaptive) is shared by both studies and trained once. Every
variant is trained with the same settings and seed, then evaluated on the test split; the
table gives slice and patient metrics and DeLong's p-value of each variant's AUC against the
full model's on the same images.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from mutex_attn.train import write_csv_atomic, write_text_atomic

FULL = ("adaptive", "mab+fab")
STUDIES = {
    "loss": [("CE", "ce", "mab+fab"), ("CE + CS (1:1)", "equal", "mab+fab"),
             ("adaptive (MA-Net)", "adaptive", "mab+fab")],
    "blocks": [("basic network", "adaptive", "none"), ("+ MAB", "adaptive", "mab"),
               ("+ MAB + FAB (MA-Net)", "adaptive", "mab+fab")],
}


def run_ablation(settings: dict, *, output, studies: str = "loss,blocks", log=print) -> list[dict]:
    from mutex_attn.evaluate import PREDICTIONS, compare_runs, evaluate, read_predictions
    from mutex_attn.train import train

    chosen = [s.strip() for s in studies.split(",") if s.strip()]
    bad = [s for s in chosen if s not in STUDIES]
    if bad or not chosen:
        raise ValueError(f"unknown ablation study {bad or studies!r}; choose from {', '.join(STUDIES)}")
    settings = dict(settings)
    settings.setdefault("model", "manet_resnet50")
    if not settings["model"].startswith("manet_"):
        raise ValueError(f"ablations apply to MA-Net models; got {settings['model']!r}")
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)

    variants = {}  # (loss, blocks) -> folder name; the full model once
    for study in chosen:
        for _, loss, blocks in STUDIES[study]:
            variants[(loss, blocks)] = f"{blocks.replace('+', '_')}-{loss}"
    reports = {}
    for (loss, blocks), name in variants.items():
        run = root / name
        log(f"\n== ablation variant {name}: blocks {blocks}, loss {loss}")
        variant = {**settings, "loss": loss, "blocks": blocks, "output": str(run)}
        if (run / "last.pt").is_file():  # an earlier, interrupted or finished, ablation run
            train(resume=str(run / "last.pt"), overrides={"epochs": variant.get("epochs", 120)})
        else:
            train(variant)
        reports[(loss, blocks)] = evaluate(run, output=str(run / "eval-test"), progress=False,
                                           log=lambda *a: None)

    rows = []
    for study in chosen:
        for label, loss, blocks in STUDIES[study]:
            report = reports[(loss, blocks)]
            row = {"study": study, "variant": label, "loss": loss, "blocks": blocks}
            for level in ("slice", "patient_mean"):
                for metric in ("accuracy", "sensitivity", "specificity", "f1", "auc"):
                    row[f"{level}_{metric}"] = report.get(level, {}).get(metric, math.nan)
            row["p_vs_full"] = math.nan
            if FULL in reports and (loss, blocks) != FULL:
                ours = read_predictions(Path(report["output"]) / PREDICTIONS)
                cmp = compare_runs(ours, reports[FULL]["output"], split="test", data=None,
                                   dataset=None, workers=0, device="cpu", log=log)
                row["p_vs_full"] = cmp["slice"]["p_value"]
            rows.append(row)

    write_csv_atomic(root / "ablation.csv", rows)
    table = format_table(rows)
    write_text_atomic(root / "ablation.md", table + "\n")
    write_text_atomic(root / "ablation.json", json.dumps(rows, indent=2, default=str))
    log("\n" + table)
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table, one block per study, like the paper's Tables 7 and 8."""
    head = ("| study | variant | acc | sens | spec | F1 | AUC | patient acc | patient AUC | p vs MA-Net |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        cells = [r["slice_accuracy"], r["slice_sensitivity"], r["slice_specificity"], r["slice_f1"],
                 r["slice_auc"], r["patient_mean_accuracy"], r["patient_mean_auc"]]
        p = r["p_vs_full"]
        lines.append("| " + " | ".join([r["study"], r["variant"], *(_fmt(c) for c in cells),
                                        "—" if math.isnan(p) else f"{p:.3g}"]) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
