"""`mutex-attn evaluate`: a trained model on a dataset split, at slice and patient level.

Writes into the output folder: predictions.csv (one row per image), metrics.json (slice,
patient-mean and patient-vote metrics, AUCs with DeLong 95% intervals, and with `--compare`
DeLong's p-value against another model on the same images), roc.png and the confusion
matrices. COVID is the positive class. Only the plain backbone runs: inference never needs a
mutex image.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mutex_attn.train import (
    load_checkpoint,
    model_from_checkpoint,
    pick_device,
    predict,
    write_csv_atomic,
    write_text_atomic,
)

PREDICTIONS = "predictions.csv"


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or a run folder (its best.pt, else last.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds no best.pt or last.pt: is it a training run folder?")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def evaluate(
    checkpoint, *, data: str | None = None, dataset: str | None = None, split: str = "test",
    output: str | None = None, batch_size: int = 32, workers: int = 2, device: str = "auto",
    backend: str | None = None, compare: str | None = None, threshold: float = 0.5,
    progress: bool = True, log=print,
) -> dict:
    """Evaluate `checkpoint` on `split` of `data` (default: the data it was trained on)."""
    from mutex_attn.data.datasets import SliceDataset, load_dataset
    from mutex_attn.data.transforms import eval_transform
    from mutex_attn.metrics import (
        delong_auc_ci,
        evaluate_predictions,
        format_metrics_table,
        plot_confusion_matrix,
        plot_roc,
    )

    path = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(path)
    model, config = model_from_checkpoint(ckpt, backend)
    data = data or config.data
    if not data:
        raise ValueError("the checkpoint names no dataset: pass --data DIR")
    slices = load_dataset(
        data, split, kind=dataset or config.dataset, on_error=config.on_error, seed=config.seed,
        val_fraction=config.val_fraction, test_fraction=config.test_fraction,
    )
    ds = SliceDataset(slices, transform=eval_transform(config.img_size))
    dev = pick_device(device)
    model = model.to(dev)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers)
    probs, labels, loss = predict(model, loader, dev, config.amp, config.channels_last,
                                  progress=progress, desc=f"evaluate {split}")

    bad = int((~np.isfinite(probs)).sum())
    if bad:
        raise ValueError(
            f"{path}: the model's outputs are not finite for {bad} of {len(probs)} images "
            "(a model trained for a few steps can have BatchNorm statistics that do not fit its "
            "weights yet: train longer, or with --clip-grad)"
        )
    out = Path(output) if output else path.parent / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {"image": s.source if s.index is None else f"{s.source}#{s.index}", "patient": s.patient,
         "label": int(y), "prob_covid": float(p), "predicted": int(p >= threshold)}
        for s, y, p in zip(slices, labels, probs)
    ]
    write_csv_atomic(out / PREDICTIONS, rows, ["image", "patient", "label", "prob_covid", "predicted"])

    results = evaluate_predictions(labels, probs, ds.patients, threshold=threshold)
    results["slice"]["loss"] = loss
    levels = _level_scores(labels, probs, ds.patients)  # labels and scores per level, once
    for level, (y, s) in levels.items():
        auc, low, high = _safe_ci(delong_auc_ci, y, s)
        results[level]["auc_ci95"] = [low, high]
    report = {
        "checkpoint": str(path), "epoch": int(ckpt["epoch"]), "model": config.model,
        "data": str(data), "split": split, "threshold": threshold, **results,
    }
    if compare:
        report["compare"] = compare_runs(rows, compare, split=split, data=data, dataset=dataset,
                                         workers=workers, device=device, log=log)

    names = {"slice": "slice", "patient_mean": "patient (mean probability)"}
    curves = {names[level]: pair for level, pair in levels.items() if len(set(pair[0].tolist())) == 2}
    if curves:
        plot_roc(curves, out / "roc.png", title=f"{config.model} on {split}")
    plot_confusion_matrix(results["slice"], out / "confusion_slice.png", title="slice level")
    if "patient_mean" in results:
        plot_confusion_matrix(results["patient_mean"], out / "confusion_patient.png",
                              title="patient level (mean probability)")
    write_text_atomic(out / "metrics.json", json.dumps(to_jsonable(report), indent=2))
    log(format_metrics_table(results))
    if "compare" in report:
        c = report["compare"]
        log(f"DeLong vs {c['other']}: slice AUC {c['slice']['auc_a']:.3f} vs {c['slice']['auc_b']:.3f}, "
            f"p = {c['slice']['p_value']:.4g}")
    log(f"wrote {out}/metrics.json, {PREDICTIONS}, roc.png, confusion_*.png")
    report["output"] = str(out)
    return report


def _level_scores(labels, probs, patients) -> dict:
    from mutex_attn.metrics import aggregate_patients

    levels = {"slice": (np.asarray(labels), np.asarray(probs))}
    if patients is not None:
        y, s, _ = aggregate_patients(labels, probs, patients, rule="mean")
        levels["patient_mean"] = (y, s)
    return levels


def _safe_ci(fn, y, s):
    """DeLong's interval needs two cases of each class; NaN where it is undefined."""
    if min(np.bincount(np.asarray(y, dtype=np.int64), minlength=2)) < 2:
        return math.nan, math.nan, math.nan
    return fn(y, s)


def read_predictions(path) -> list[dict]:
    with open(path, newline="") as f:
        return [
            {"image": r["image"], "patient": r["patient"], "label": int(r["label"]),
             "prob_covid": float(r["prob_covid"])}
            for r in csv.DictReader(f)
        ]


def compare_runs(rows: list[dict], other: str, *, split: str, data, dataset, workers, device, log) -> dict:
    """DeLong's test between these predictions and another model's on the same images.

    `other`: an evaluation folder (with predictions.csv) or a run folder / checkpoint, which is
    then evaluated on the same split first.
    """
    from mutex_attn.metrics import aggregate_patients, delong_test

    other_path = Path(other)
    if (other_path / PREDICTIONS).is_file():
        other_rows = read_predictions(other_path / PREDICTIONS)
    else:
        ckpt = resolve_checkpoint(other_path)
        sub = evaluate(ckpt, data=data, dataset=dataset, split=split, workers=workers,
                       device=device, progress=False, log=lambda *a: None)
        other_rows = read_predictions(Path(sub["output"]) / PREDICTIONS)
    theirs = {r["image"]: r for r in other_rows}
    missing = [r["image"] for r in rows if r["image"] not in theirs]
    if missing or len(theirs) != len(rows):
        raise ValueError(
            f"--compare needs predictions on the same images: {len(missing)} of ours are not in "
            f"{other} (e.g. {missing[:2]}), which has {len(theirs)} images to our {len(rows)}"
        )
    labels = np.array([r["label"] for r in rows])
    if any(theirs[r["image"]]["label"] != r["label"] for r in rows):
        raise ValueError(f"{other} labels the same images differently: not the same dataset")
    ours = np.array([r["prob_covid"] for r in rows])
    their = np.array([theirs[r["image"]]["prob_covid"] for r in rows])
    result = {"other": str(other), "slice": delong_test(labels, ours, their)._asdict()}
    patients = [r["patient"] for r in rows]
    y_a, s_a, _ = aggregate_patients(labels, ours, patients, rule="mean")
    _, s_b, _ = aggregate_patients(labels, their, patients, rule="mean")
    if min(np.bincount(y_a, minlength=2)) >= 2:  # DeLong's variance needs two of each class
        result["patient_mean"] = delong_test(y_a, s_a, s_b)._asdict()
    return result


def to_jsonable(obj):
    """NaN → null (strict JSON), numpy → Python."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
