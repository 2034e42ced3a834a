"""`mutex-attn predict` and `mutex-attn export`: diagnose new scans, and export a trained model.

    mutex-attn predict scan/ --checkpoint runs/a                  # a DICOM series, NIfTI or images
    mutex-attn predict --checkpoint runs/a --target-sensitivity 0.95   # calibrate only
    mutex-attn export runs/a --output deploy/a                     # TorchScript + ONNX + metadata
    mutex-attn predict scan.nii.gz --checkpoint deploy/a           # the exported model

Prediction: every slice of the scan (`mutex_attn.scans`) gets P(COVID) from the plain backbone
(the MA-Net mutex path is a training device only), with the evaluation's preprocessing
(lung window, resize to the model's img_size, ImageNet normalisation). The patient decision is
evaluation's rule: the mean slice probability, positive when >= the threshold; the majority
vote of the slices (`mutex_attn.metrics.aggregate_patients`, rule "vote") is reported beside
it. The output folder holds predictions.csv (one row per slice), summary.json and montage.png
(the highest-scoring slices with their Grad-CAM for the COVID class).

The threshold: ``--threshold`` if given; else, for a checkpoint, ``threshold.json`` in its run
folder if there is one, else 0.5; for an exported model, the one in its metadata.json.
``--target-sensitivity S`` calibrates first: the model runs on the run's validation split and
the threshold becomes the largest one at which the validation sensitivity is still >= S
(`choose_threshold`, at patient level by default, since that is the level of the decision),
saved to threshold.json with how it was chosen.

Export: the plain backbone (`MutexNet.export_backbone()`, a torchvision model; baselines are
plain already) traced to TorchScript (model.ts: ``forward(x) -> logits`` for any batch size,
and ``forward_cam(x) -> (logits, last-stage features)`` that predict uses for Grad-CAM), and to
ONNX (model.onnx, input "image" [batch, 3, H, W], output "logits" [batch, 2]; the preprocessing
is also stored in the ONNX metadata_props), with metadata.json: preprocessing (img_size, HU
window, mean / std), threshold, class names, model name, source checkpoint. Without the
``onnx`` package the ONNX file is still written when torch can (the TorchScript-based
exporter needs no onnx; the dynamo one needs onnxscript), only not checked.

On a GPU, predict runs the checkpoint's model in bfloat16 autocast (``--amp none`` for
float32), on the CPU in float32 (``--amp bf16`` is faster where the CPU has bf16 units); an
exported TorchScript model runs in float32. Models and batches are channels_last.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mutex_attn.data.datasets import LUNG_WINDOW
from mutex_attn.data.transforms import MEAN, STD, eval_transform
from mutex_attn.evaluate import to_jsonable, resolve_checkpoint
from mutex_attn.train import AMP_DTYPES, load_checkpoint, model_from_checkpoint, pick_device, write_text_atomic

EXPORT_FORMAT = "mutex_attn-export"
EXPORT_VERSION = 1
METADATA = "metadata.json"
TORCHSCRIPT = "model.ts"
ONNX_FILE = "model.onnx"
THRESHOLD_FILE = "threshold.json"
CLASS_NAMES = ("non-COVID", "COVID")  # index = class; COVID (1) is the positive class
DEFAULT_THRESHOLD = 0.5


# --------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------
def choose_threshold(labels, scores, target_sensitivity: float) -> dict:
    """The largest threshold t with sensitivity(score >= t) >= target on these cases.

    Sensitivity only falls as t rises, so t is the k-th largest positive score with
    k = ceil(target · positives): any larger t leaves fewer than k positives at or above it.
    Returns threshold, the sensitivity and specificity reached there, and the case counts.
    """
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"the target sensitivity must lie in (0, 1], got {target_sensitivity}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite to choose a threshold")
    pos = np.sort(s[y == 1])[::-1]
    if pos.size == 0:
        raise ValueError("choosing a threshold for a target sensitivity needs positive (COVID) cases")
    # round(): 0.95 · 20 is 19.000000000000004 in floating point, and must give k = 19
    k = max(1, math.ceil(round(target_sensitivity * pos.size, 9)))
    t = float(pos[k - 1])
    neg = s[y == 0]
    return {
        "threshold": t,
        "sensitivity": float((pos >= t).mean()),
        "specificity": float((neg < t).mean()) if neg.size else float("nan"),
        "positives": int(pos.size), "negatives": int(neg.size),
    }


def saved_threshold(checkpoint: Path) -> tuple[float, str]:
    """(threshold, where it came from) for a checkpoint: its run's threshold.json, else 0.5."""
    checkpoint = Path(checkpoint)
    file = checkpoint.parent / THRESHOLD_FILE
    if not file.is_file():
        return DEFAULT_THRESHOLD, "default"
    try:
        record = json.loads(file.read_text())
        t = float(record["threshold"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{file}: not a threshold file ({exc}); remove it or recalibrate") from None
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"{file}: threshold {t} is not a probability")
    made_for = record.get("checkpoint")
    if made_for and Path(made_for).name != checkpoint.name:
        warnings.warn(f"{file} was calibrated for {Path(made_for).name}, not {checkpoint.name}")
    return t, str(file)


def calibrate(checkpoint, target_sensitivity: float, *, level: str = "patient", data: str | None = None,
              batch_size: int = 32, workers: int = 0, device: str = "auto", amp: str = "auto",
              progress: bool = True, log=print) -> dict:
    """Choose the threshold on the run's validation split for a target sensitivity and save
    it to threshold.json in the run folder (see module doc). Returns what was saved."""
    from mutex_attn.data.datasets import SliceDataset, load_dataset
    from mutex_attn.metrics import aggregate_patients
    from mutex_attn.train import predict as run_model

    if level not in ("patient", "slice"):
        raise ValueError(f"level must be 'patient' or 'slice', got {level!r}")
    path = resolve_checkpoint(checkpoint)
    model, config = model_from_checkpoint(load_checkpoint(path))
    data = data or config.data
    if not data:
        raise ValueError(f"{path} names no dataset to calibrate on: pass --data DIR")
    slices = load_dataset(data, "val", kind=config.dataset, seed=config.seed,
                          val_fraction=config.val_fraction, test_fraction=config.test_fraction)
    ds = SliceDataset(slices, transform=eval_transform(config.img_size))
    dev = pick_device(device)
    amp_name, channels_last = _numerics(dev, amp, eager=True)
    model = model.to(dev, memory_format=torch.channels_last) if channels_last else model.to(dev)
    probs, labels, _ = run_model(model, DataLoader(ds, batch_size=batch_size, num_workers=workers),
                                 dev, amp_name, channels_last, progress=progress, desc="validate")
    if level == "patient":
        labels, scores, _ = aggregate_patients(labels, probs, ds.patients, rule="mean")
    else:
        scores = probs
    chosen = choose_threshold(labels, scores, target_sensitivity)
    record = {
        **chosen,
        "method": "target_sensitivity", "target_sensitivity": float(target_sensitivity),
        "level": level, "rule": "mean slice probability per patient" if level == "patient" else "slice",
        "split": "val", "data": str(data), "checkpoint": str(path),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_text_atomic(path.parent / THRESHOLD_FILE, json.dumps(to_jsonable(record), indent=2))
    log(f"threshold {chosen['threshold']:.4f}: validation sensitivity {chosen['sensitivity']:.3f} "
        f"(target {target_sensitivity}), specificity {chosen['specificity']:.3f} on "
        f"{chosen['positives']} + {chosen['negatives']} {level}s; saved to {path.parent / THRESHOLD_FILE}")
    return record


def patient_decision(probs, threshold: float) -> dict:
    """Evaluation's patient rules for the slices of one scan: mean probability >= threshold,
    and the majority vote of the slices (ties broken by the mean)."""
    from mutex_attn.metrics import aggregate_patients

    p = np.asarray(probs, dtype=np.float64)
    zeros, one = np.zeros(p.size, dtype=np.int64), ["scan"] * p.size
    _, mean, _ = aggregate_patients(zeros, p, one, rule="mean", threshold=threshold)
    _, vote, _ = aggregate_patients(zeros, p, one, rule="vote", threshold=threshold)
    positive = bool(mean[0] >= threshold)
    return {
        "probability": float(mean[0]), "positive": positive, "decision": CLASS_NAMES[positive],
        "rule": "mean slice probability >= threshold",
        "majority_vote": {
            "positive_slices": int((p >= threshold).sum()), "slices": int(p.size),
            "fraction": float((p >= threshold).mean()), "positive": bool(vote[0] >= 0.5),
            "decision": CLASS_NAMES[bool(vote[0] >= 0.5)],
        },
    }


# --------------------------------------------------------------------------------------------
# The model: a checkpoint or an exported TorchScript folder
# --------------------------------------------------------------------------------------------
def _numerics(device: torch.device, amp: str, eager: bool) -> tuple[str | None, bool]:
    """(autocast dtype name or None, channels_last). "auto" is bf16 on a GPU, float32 on the
    CPU (where --amp bf16 is up to 2x faster on CPUs with AVX-512 BF16 or AMX). channels_last
    everywhere: cuDNN and oneDNN both run NHWC convolutions faster (about 1.8x for ResNet-50
    on the 2-core development VM), with the same results to float32 rounding."""
    if amp not in ("auto", "none", *AMP_DTYPES):
        raise ValueError(f"amp must be auto, none, {', '.join(AMP_DTYPES)}; got {amp!r}")
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and eager else "none"
    if amp != "none" and not eager:
        raise ValueError("an exported TorchScript model runs in float32: use --amp none")
    return (None if amp == "none" else amp), True


def is_export(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / METADATA).is_file()


@dataclasses.dataclass
class Predictor:
    """A model ready for slices: `probabilities(x)` and `grad_cam(x)` on normalised batches."""

    model: nn.Module  # eager model, or TorchScript module; model(x) -> logits [N, 2]
    kind: str  # checkpoint | torchscript
    model_name: str
    source: str
    img_size: int
    threshold: float
    threshold_source: str
    device: torch.device
    amp: str | None = None
    channels_last: bool = False

    def transform(self):
        return eval_transform(self.img_size)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        with torch.autocast(self.device.type, dtype=AMP_DTYPES.get(self.amp, torch.float32),
                            enabled=self.amp is not None):
            logits = self.model(self._input(x))
        return torch.softmax(logits.float(), 1)[:, 1].cpu().numpy()

    def grad_cam(self, x: torch.Tensor) -> np.ndarray | None:
        """Grad-CAM maps [N, H, W] in [0, 1] for COVID; None when the model offers no way."""
        x = self._input(x)
        if self.kind == "checkpoint":
            from mutex_attn.cam import grad_cam

            return grad_cam(self.model, x)
        if not hasattr(self.model, "forward_cam"):
            return None
        # A traced module runs no Python hooks, so export traced forward_cam to hand out the
        # last stage's features; this is Grad-CAM's formula on them.
        with torch.enable_grad():
            logits, feats = self.model.forward_cam(x)
            grads, = torch.autograd.grad(logits[:, 1].sum(), feats)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * feats).sum(1, keepdim=True)).detach().float()
        # as pytorch-grad-cam does: scaled to [0, 1], resized, and scaled to [0, 1] again
        cam = _unit_range(F.interpolate(_unit_range(cam), size=x.shape[-2:], mode="bilinear", align_corners=False))
        return cam[:, 0].cpu().numpy()


def _unit_range(m: torch.Tensor) -> torch.Tensor:
    m = m - m.amin(dim=(2, 3), keepdim=True)
    return m / (m.amax(dim=(2, 3), keepdim=True) + 1e-7)


def load_predictor(path, *, device: str = "auto", backend: str | None = None, amp: str = "auto",
                   threshold: float | None = None) -> Predictor:
    """A checkpoint (file or run folder) or an exported model folder, ready to predict."""
    dev = pick_device(device)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must lie in [0, 1], got {threshold}")
    path = Path(path)
    if is_export(path):
        meta = read_metadata(path)
        amp_name, channels_last = _numerics(dev, amp, eager=False)
        with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path / meta["files"]["torchscript"]), map_location=dev)
        model.eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        t, source = (threshold, "--threshold") if threshold is not None else (
            float(meta["threshold"]), f"{path / METADATA} ({meta.get('threshold_source', '')})")
        return Predictor(model, "torchscript", meta["model"], str(path), int(meta["img_size"]), t, source,
                         dev, amp_name, channels_last)
    ckpt_path = resolve_checkpoint(path)
    model, config = model_from_checkpoint(load_checkpoint(ckpt_path), backend)
    amp_name, channels_last = _numerics(dev, amp, eager=True)
    model = model.to(dev, memory_format=torch.channels_last) if channels_last else model.to(dev)
    t, source = (threshold, "--threshold") if threshold is not None else saved_threshold(ckpt_path)
    return Predictor(model, "checkpoint", config.model, str(ckpt_path), config.img_size, t, source,
                     dev, amp_name, channels_last)


def read_metadata(folder) -> dict:
    """metadata.json of an export, checked to describe the preprocessing this package does."""
    file = Path(folder) / METADATA
    meta = json.loads(file.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{file} is not a mutex_attn export (format {meta.get('format')!r})")
    pre = meta.get("preprocessing", {})
    same = (tuple(pre.get("window_hu", ())) == LUNG_WINDOW
            and np.allclose(pre.get("mean", ()), MEAN) and np.allclose(pre.get("std", ()), STD))
    if not same:
        raise ValueError(f"{file}: the export's preprocessing {pre} is not this package's "
                         f"(window {LUNG_WINDOW}, mean {MEAN}, std {STD})")
    meta["img_size"] = int(pre["img_size"])
    return meta


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------
class _Slices(Dataset):
    def __init__(self, slices, transform):
        self.slices, self.transform = slices, transform

    def __len__(self):
        return len(self.slices)

    def __getitem__(self, i):
        return self.transform(self.slices[i].rgb())


def _default_output(path: Path) -> Path:
    name = path.name[:-7] if path.name.lower().endswith(".nii.gz") else path.stem if path.is_file() else path.name
    return Path("predictions") / (name or "scan")


def predict_scan(
    input_path, checkpoint, *, output: str | None = None, threshold: float | None = None,
    lung_only: bool = False, fmt: str = "auto", on_error: str = "raise", series: str | None = None,
    batch_size: int = 32, workers: int = 0, device: str = "auto", amp: str = "auto",
    backend: str | None = None, top: int = 6, cam: bool = True, progress: bool = True, log=print,
) -> dict:
    """Diagnose one scan (see module doc); returns the summary written to summary.json.

    `checkpoint`: a run folder, checkpoint file or export folder, or a loaded `Predictor`
    (to diagnose many scans with one model; device, amp and backend are then its own)."""
    from tqdm.auto import tqdm

    from mutex_attn.scans import has_lung, read_scan

    t0 = time.perf_counter()
    input_path = Path(input_path)
    if isinstance(checkpoint, Predictor):
        predictor = checkpoint
        if threshold is not None:
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"--threshold must lie in [0, 1], got {threshold}")
            predictor = dataclasses.replace(predictor, threshold=threshold, threshold_source="--threshold")
    else:
        predictor = load_predictor(checkpoint, device=device, backend=backend, amp=amp, threshold=threshold)
    t_load = time.perf_counter()
    scan = read_scan(input_path, fmt, on_error=on_error, series=series, progress=progress)
    t_read = time.perf_counter()

    lung = [has_lung(s.grey()) for s in scan.slices] if lung_only else [True] * len(scan)
    used = [i for i, ok in enumerate(lung) if ok]
    if not used:
        raise ValueError(f"{input_path}: none of its {len(scan)} slices passed the lung check (--lung-only)")
    loader = DataLoader(_Slices([scan.slices[i] for i in used], predictor.transform()),
                        batch_size=batch_size, num_workers=workers)
    chunks = [predictor.probabilities(x) for x in tqdm(loader, desc="predict", disable=not progress,
                                                       leave=False, dynamic_ncols=True, unit="batch")]
    probs = np.concatenate(chunks)
    t_model = time.perf_counter()
    if not np.isfinite(probs).all():
        raise ValueError(f"{predictor.source}: the model's outputs are not finite for "
                         f"{int((~np.isfinite(probs)).sum())} slices")
    result = patient_decision(probs, predictor.threshold)

    out = Path(output) if output else _default_output(input_path)
    out.mkdir(parents=True, exist_ok=True)
    prob_of = dict(zip(used, probs.tolist()))
    rows = [{
        "index": i, "file": s.name, "position_mm": "" if s.position is None else f"{s.position:.3f}",
        "lung": int(lung[i]) if lung_only else "", "used": int(i in prob_of),
        "prob_covid": prob_of[i] if i in prob_of else "",
        "predicted": int(prob_of[i] >= predictor.threshold) if i in prob_of else "",
    } for i, s in enumerate(scan.slices)]
    _write_csv(out / "predictions.csv", rows)

    ranked = sorted(used, key=lambda i: -prob_of[i])[:max(top, 0)]
    montage = None
    if ranked:
        montage = out / "montage.png"
        _montage(predictor, scan, ranked, prob_of, montage, result, cam)

    summary = {
        "input": str(input_path), "format": scan.kind, "scan": scan.info,
        "model": predictor.model_name, "model_source": predictor.source, "model_kind": predictor.kind,
        "threshold": predictor.threshold, "threshold_source": predictor.threshold_source,
        "patient": {k: v for k, v in result.items() if k != "majority_vote"},
        "majority_vote": result["majority_vote"],
        "counts": {"slices": len(scan), "used": len(used), "without_lung": len(scan) - len(used),
                   "files_skipped": len(scan.skipped)},
        "lung_only": lung_only,
        "skipped_files": [{"file": f, "reason": r} for f, r in scan.skipped],
        "top_slices": [{"index": i, "file": scan.slices[i].name, "prob_covid": prob_of[i]} for i in ranked],
        "files": {"predictions": "predictions.csv", "montage": montage.name if montage else None},
        "device": str(predictor.device), "amp": predictor.amp,
        # model: preprocessing and the forward passes; total: also the outputs and Grad-CAM
        "seconds": {"load_model": t_load - t0, "read": t_read - t_load, "model": t_model - t_read,
                    "total": time.perf_counter() - t0},
    }
    write_text_atomic(out / "summary.json", json.dumps(to_jsonable(summary), indent=2))
    vote = result["majority_vote"]
    log(f"{input_path}: P(COVID) = {result['probability']:.3f} over {len(used)} slices, threshold "
        f"{predictor.threshold:.3f} -> {result['decision']} (majority vote: {vote['positive_slices']}/"
        f"{vote['slices']} slices -> {vote['decision']})"
        + (f"; skipped {len(scan.skipped)} file(s)" if scan.skipped else "") + f"; wrote {out}")
    summary["output"] = str(out)
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, ["index", "file", "position_mm", "lung", "used", "prob_covid", "predicted"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _montage(predictor: Predictor, scan, ranked: list[int], prob_of: dict, path: Path, result: dict,
             with_cam: bool) -> None:
    """The top slices in a grid, each with its Grad-CAM (COVID) overlaid when there is one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mutex_attn.cam import denormalise

    tf = predictor.transform()
    x = torch.stack([tf(scan.slices[i].rgb()) for i in ranked])
    maps = predictor.grad_cam(x) if with_cam else None
    cols = min(len(ranked), 3)
    rows = math.ceil(len(ranked) / cols)
    fig = Figure(figsize=(3.0 * cols, 3.2 * rows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for ax, k in zip(axes, range(len(ranked))):
        i = ranked[k]
        ax.imshow(denormalise(x[k]))
        if maps is not None and maps[k].max() > 0:  # an all-zero map would only tint the slice
            ax.imshow(maps[k], cmap="jet", alpha=0.4, vmin=0, vmax=1)
        name = Path(scan.slices[i].name).name
        ax.set_title(f"#{i} {name[:18]}\nP(COVID) = {prob_of[i]:.3f}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    cam_note = "Grad-CAM (COVID)" if maps is not None else "no Grad-CAM"
    fig.suptitle(f"{result['decision']}: mean P(COVID) {result['probability']:.3f}, threshold "
                 f"{predictor.threshold:.3f}; top slices, {cam_note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
class _Traceable(nn.Module):
    """The plain backbone with a second entry point that also returns the Grad-CAM layer's
    output (captured by a hook while tracing: the traced graph keeps it as an output)."""

    def __init__(self, model: nn.Module, cam_layer: str | None):
        super().__init__()
        self.model = model
        self.cam_layer = cam_layer

    def forward(self, x):
        return self.model(x)

    def forward_cam(self, x):
        store = []
        hook = self.model.get_submodule(self.cam_layer).register_forward_hook(lambda m, i, o: store.append(o))
        try:
            logits = self.model(x)
        finally:
            hook.remove()
        return logits, store[0]


def _cam_layer_name(model: nn.Module) -> str | None:
    from mutex_attn.cam import target_layer

    try:
        layer = target_layer(model)
    except ValueError:
        return None
    return next((name for name, m in model.named_modules() if m is layer and name), None)


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> str | None:
    """Write model.onnx; returns None, or why it could not be written."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        dynamo = True
    except ImportError:
        dynamo = False
    kwargs = dict(input_names=["image"], output_names=["logits"], opset_version=opset)
    attempts = [dynamo, False] if dynamo else [False]
    errors = []
    for use_dynamo in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation notes of the TorchScript exporter
                if use_dynamo:
                    batch = torch.export.Dim("batch", min=1)
                    torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=({0: batch},), **kwargs)
                else:
                    torch.onnx.export(model, (x,), str(path), dynamo=False, **kwargs,
                                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
            return None
        except Exception as exc:  # exporters fail in many ways; TorchScript is still there
            errors.append(f"{'dynamo' if use_dynamo else 'torchscript'} exporter: {type(exc).__name__}: {exc}")
    path.unlink(missing_ok=True)
    return "; ".join(errors)


def export_model(run, output, *, onnx: bool = True, opset: int = 17, log=print) -> dict:
    """Write model.ts, model.onnx (if possible) and metadata.json to `output` (module doc)."""
    from mutex_attn.models import MutexNet

    path = resolve_checkpoint(run)
    ckpt = load_checkpoint(path)
    model, config = model_from_checkpoint(ckpt)
    backbone = (model.export_backbone() if isinstance(model, MutexNet) else model).eval()
    threshold, threshold_source = saved_threshold(path)
    size = config.img_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=gen)
    x3 = torch.randn(3, 3, size, size, generator=gen)  # another batch size: the axis is dynamic
    with torch.no_grad():
        ref = model(x3)
        diff = (backbone(x3) - ref).abs().max().item()
    if not diff <= 1e-4 * (1.0 + ref.abs().max().item()):
        raise RuntimeError(f"{path}: the exported backbone differs from the model by {diff:g}")

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cam_layer = _cam_layer_name(backbone)
    methods = {"forward": x, **({"forward_cam": x} if cam_layer else {})}
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(_Traceable(backbone, cam_layer).eval(), methods)
        tmp = out / f".{TORCHSCRIPT}.tmp"
        torch.jit.save(traced, str(tmp))
        tmp.replace(out / TORCHSCRIPT)
    with torch.no_grad():
        ts_diff = (traced(x3) - ref).abs().max().item()

    preprocessing = {
        "img_size": size, "window_hu": list(LUNG_WINDOW), "mean": list(MEAN), "std": list(STD),
        "steps": [f"HU (DICOM: stored * RescaleSlope + RescaleIntercept) clipped to {list(LUNG_WINDOW)} "
                  "and mapped linearly to 0..255 (uint8, rounded)", "grey -> RGB (3 equal channels)",
                  f"resize to {size}x{size} (bilinear, antialiased)", "divide by 255",
                  "subtract mean, divide by std (per channel)"],
        "layout": "float32 [batch, 3, H, W]",
    }
    meta = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": config.model,
        "class_names": list(CLASS_NAMES), "positive_class": 1, "output": "logits [batch, 2]; P(COVID) = softmax(logits)[:, 1]",
        "preprocessing": preprocessing, "threshold": threshold, "threshold_source": threshold_source,
        "patient_rule": "mean P(COVID) over the scan's slices >= threshold",
        "source_checkpoint": str(path), "epoch": int(ckpt.get("epoch", 0)),
        "files": {"torchscript": TORCHSCRIPT, "onnx": None},
        "torchscript": {"methods": sorted(methods), "cam_layer": cam_layer, "max_abs_diff": ts_diff},
        "torch": torch.__version__, "exported": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if onnx:
        problem = _export_onnx(backbone, x, out / ONNX_FILE, opset)
        if problem is None:
            meta["files"]["onnx"] = ONNX_FILE
            meta["onnx"] = {"opset": opset, "input": "image", "output": "logits", **_check_onnx(out / ONNX_FILE, meta, x3, ref)}
        else:
            meta["onnx"] = {"error": problem}
            warnings.warn(f"no ONNX file: {problem}")
    write_text_atomic(out / METADATA, json.dumps(to_jsonable(meta), indent=2))
    log(f"exported {config.model} from {path} to {out}: {TORCHSCRIPT}"
        + (f", {ONNX_FILE}" if meta["files"]["onnx"] else "") + f", {METADATA} (threshold {threshold:.3f})")
    return meta


def _check_onnx(file: Path, meta: dict, x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Check the ONNX file, store the metadata in it, and compare with onnxruntime when they
    are installed; says what was not done."""
    info: dict = {}
    try:
        import onnx
    except ImportError:
        info["checked"] = "no (the onnx package is not installed)"
        return info
    model = onnx.load(str(file))
    onnx.checker.check_model(model)
    for key in ("model", "class_names", "preprocessing", "threshold", "source_checkpoint"):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(meta[key])
    onnx.save(model, str(file))
    info["checked"] = "onnx.checker"
    try:
        import onnxruntime as ort
    except ImportError:
        info["onnxruntime"] = "not installed"
        return info
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": x.numpy()})[0]
    info["max_abs_diff"] = float(np.abs(logits - ref.numpy()).max())
    return info
