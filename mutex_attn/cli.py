"""The `mutex-attn` command (also `python -m mutex_attn`).

    mutex-attn synth    --out data/synth-ct                     synthetic chest-CT slices
    mutex-attn train    --data data/synth-ct --output runs/a    train MA-Net or a baseline
    mutex-attn evaluate runs/a [--split test] [--compare runs/b]
    mutex-attn cam      runs/a [--images a.png b.png]           Grad-CAM and Fig. 9 panels
    mutex-attn ablate   --data data/synth-ct --output runs/abl  the paper's Tables 7 and 8
    mutex-attn predict  SCAN --checkpoint runs/a               diagnose a DICOM/NIfTI/image scan
    mutex-attn export   runs/a --output deploy/                TorchScript + ONNX + metadata
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

HELP = {
    "data": "dataset root (COVID-CT layout, SARS-CoV-2 folders, NIfTI volumes, or COVID/ + NonCOVID/)",
    "dataset": "dataset layout: auto, covid-ct, sars-cov-2, nifti, folder",
    "model": "manet_resnet50, manet_densenet169, or a baseline: resnet50, densenet169, seresnet50, cbam_resnet50",
    "pretrained": "'imagenet' (from the local torch hub cache; nothing is downloaded) or a weights file",
    "epochs": "number of epochs (paper: 120)",
    "batch_size": "images per step and process (paper: 16)",
    "optimizer": "sgd (paper) or adamw",
    "lr": "initial learning rate (paper: 0.01)",
    "momentum": "SGD momentum, or AdamW's beta1 (paper: 0.9)",
    "weight_decay": "weight decay (decoupled for AdamW)",
    "schedule": "halving: lr * 0.5^(epoch / lr_half_life) (paper), or cosine: down to 0 over the run",
    "lr_half_life": "epochs over which the learning rate halves, for --schedule halving (paper: 30)",
    "warmup_epochs": "linear learning-rate warm-up from 1%% over this many epochs (fractions allowed)",
    "img_size": "images are resized to this square size (paper: 224)",
    "augment": "horizontal/vertical flips and random rotation of training images",
    "rotation": "largest random rotation, degrees",
    "loss": "ce (L_CE only), equal (L_CE + L_CS), adaptive (MA-Net's adaptive weights)",
    "blocks": "attention on the mutex path: mab+fab (MA-Net), mab, none",
    "backend": "operator backend of the attention blocks: auto, reference, native, triton",
    "amp": "mixed precision: bf16 or fp16",
    "channels_last": "channels_last memory format for the model and the images",
    "compile": "torch.compile the model",
    "clip_grad": "clip the gradient norm to this (off by default)",
    "workers": "DataLoader worker processes",
    "seed": "seed of everything random (order, pairs, augmentation, initial weights)",
    "device": "auto, cpu, cuda, cuda:N",
    "output": "run folder (default runs/<model>-<time>)",
    "val_split": "split used for validation each epoch ('' for none)",
    "best_metric": "validation number that picks best.pt: auc, patient_auc, accuracy, loss",
    "val_fraction": "validation share for datasets without fixed splits",
    "test_fraction": "test share for datasets without fixed splits",
    "on_error": "unreadable images: raise (stop, naming the file) or skip (count and warn)",
    "max_steps_per_epoch": "cut every epoch short after this many steps (smoke runs)",
    "progress": "progress bars",
}
SHORT = {"batch_size": ["-b"]}


def _field_type(field: dataclasses.Field):
    """int/float/str for a TrainConfig field ('X | None' gives X)."""
    hint = typing.get_type_hints(_train_config())[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _train_config():
    from mutex_attn.train import TrainConfig

    return TrainConfig


def add_train_options(parser: argparse.ArgumentParser, skip=()) -> None:
    """One flag per TrainConfig field; only flags given on the command line land in the
    namespace (default SUPPRESS), so they can override a YAML config or a resumed run."""
    for field in dataclasses.fields(_train_config()):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _field_type(field)
        help_text = f"{HELP.get(field.name, '')} (default: {field.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(*SHORT.get(field.name, []), flag, type=kind,
                                default=argparse.SUPPRESS, help=help_text)
    if "blocks" not in skip:
        parser.add_argument("--no-fab", dest="blocks", action="store_const", const="mab",
                            default=argparse.SUPPRESS, help="ablation: MAB only (same as --blocks mab)")
        parser.add_argument("--no-mab", dest="blocks", action="store_const", const="none",
                            default=argparse.SUPPRESS,
                            help="ablation: no attention blocks (FAB blends MAB's output, so no MAB means no FAB)")


def load_yaml_config(path) -> dict:
    import yaml

    text = Path(path).read_text()
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file is a mapping of setting: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    known = {f.name for f in dataclasses.fields(_train_config())}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return values


def _settings(args, skip=("command", "config", "resume", "func", "studies", "output_root")) -> dict:
    """YAML config values, overridden by the flags given on the command line."""
    values = load_yaml_config(args.config) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k not in skip})
    return values


# --- subcommands -------------------------------------------------------------------------------

def cmd_synth(args) -> int:
    from mutex_attn.data.synth_ct import generate_dataset

    summary = generate_dataset(
        args.out, patients=args.patients, slices_per_patient=args.slices_per_patient,
        size=args.size, seed=args.seed, workers=args.workers, progress=not args.no_progress,
    )
    print(_synth_line(summary))
    return 0


def _synth_line(summary: dict) -> str:
    return f"synthetic CT set written to {summary.get('out_dir')}: {summary}"


def cmd_train(args) -> int:
    from mutex_attn.train import train

    settings = _settings(args)
    if args.resume:
        train(resume=args.resume, overrides=settings)
    else:
        train(settings)
    return 0


def cmd_evaluate(args) -> int:
    from mutex_attn.evaluate import evaluate

    evaluate(args.checkpoint, data=args.data, dataset=args.dataset, split=args.split,
             output=args.output, batch_size=args.batch_size, workers=args.workers,
             device=args.device, backend=args.backend, compare=args.compare,
             threshold=args.threshold, progress=not args.no_progress)
    return 0


def cmd_cam(args) -> int:
    from mutex_attn.cam import run_cam

    run_cam(args.checkpoint, images=args.images, data=args.data, split=args.split,
            count=args.count, output=args.output, device=args.device, seed=args.seed)
    return 0


def cmd_ablate(args) -> int:
    from mutex_attn.ablate import run_ablation

    run_ablation(_settings(args), output=args.output_root, studies=args.studies)
    return 0


def cmd_predict(args) -> int:
    from mutex_attn.predict import calibrate, predict_scan

    if args.input is None and args.target_sensitivity is None:
        raise ValueError("give a scan to diagnose (INPUT), or --target-sensitivity to calibrate only")
    if args.target_sensitivity is not None:
        if args.threshold is not None:
            raise ValueError("--threshold and --target-sensitivity both set the threshold: give one")
        calibrate(args.checkpoint, args.target_sensitivity, level=args.calibration_level, data=args.data,
                  batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp,
                  progress=not args.no_progress)
    if args.input is not None:
        predict_scan(args.input, args.checkpoint, output=args.output, threshold=args.threshold,
                     lung_only=args.lung_only, fmt=args.format, on_error=args.on_error,
                     series=args.series, batch_size=args.batch_size, workers=args.workers,
                     device=args.device, amp=args.amp, backend=args.backend, top=args.top,
                     cam=not args.no_cam, progress=not args.no_progress)
    return 0


def cmd_export(args) -> int:
    from mutex_attn.predict import export_model

    export_model(args.checkpoint, args.output, onnx=not args.no_onnx, opset=args.opset)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mutex-attn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the built-in synthetic chest-CT dataset")
    p.add_argument("--out", required=True, help="folder to write (COVID-CT layout)")
    p.add_argument("--patients", type=int, default=120)
    p.add_argument("--slices-per-patient", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train MA-Net or a baseline")
    p.add_argument("--config", help="YAML file of settings (flags given here override it)")
    p.add_argument("--resume", help="continue the run of this checkpoint or run folder exactly")
    add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics, ROC and confusion matrices on a split")
    p.add_argument("checkpoint", help="a run folder (its best.pt) or a checkpoint file")
    p.add_argument("--data", help="dataset root (default: the one the model was trained on)")
    p.add_argument("--dataset", help="dataset layout (default: as trained)")
    p.add_argument("--split", default="test")
    p.add_argument("--output", help="folder for the report (default: <run>/eval-<split>)")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", help="operator backend (default: as trained)")
    p.add_argument("--compare", help="another run or evaluation folder: DeLong p-value of the AUC difference")
    p.add_argument("--threshold", type=float, default=0.5, help="P(COVID) at or above which a case is positive")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("cam", help="Grad-CAM and the paper's Fig. 9 attention views")
    p.add_argument("checkpoint", help="a run folder (its best.pt) or a checkpoint file")
    p.add_argument("--images", nargs="+", help="image files (default: picked from --split)")
    p.add_argument("--data", help="dataset root (default: the one the model was trained on)")
    p.add_argument("--split", default="test")
    p.add_argument("--count", type=int, default=6, help="how many images to pick")
    p.add_argument("--output", help="folder (default: <run>/cam)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_cam)

    p = sub.add_parser("ablate", help="the paper's loss and block ablations (Tables 7 and 8)")
    p.add_argument("--config", help="YAML file of training settings")
    p.add_argument("--output", dest="output_root", required=True, help="folder for the runs and the table")
    p.add_argument("--studies", default="loss,blocks", help="loss, blocks, or both (comma-separated)")
    add_train_options(p, skip=("output", "loss", "blocks"))
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("predict", help="diagnose a new scan: DICOM series, NIfTI volume or image folder")
    p.add_argument("input", nargs="?", help="a DICOM series folder (or file), a .nii/.nii.gz volume, or "
                   "a folder of slice images (leave out with --target-sensitivity to calibrate only)")
    p.add_argument("--checkpoint", required=True, help="a run folder (its best.pt), a checkpoint file, "
                   "or a folder written by `mutex-attn export`")
    p.add_argument("--output", help="folder for predictions.csv, summary.json, montage.png "
                   "(default: predictions/<input name>)")
    p.add_argument("--threshold", type=float, help="P(COVID) at or above which the patient is positive "
                   "(default: the run's threshold.json, the export's metadata, else 0.5)")
    p.add_argument("--target-sensitivity", type=float, help="first choose the threshold on the run's "
                   "validation split: the largest with at least this sensitivity; saved to threshold.json")
    p.add_argument("--calibration-level", choices=("patient", "slice"), default="patient",
                   help="cases for --target-sensitivity: patients (mean probability, as the decision) or slices")
    p.add_argument("--data", help="dataset root for --target-sensitivity (default: the one the model was trained on)")
    p.add_argument("--lung-only", action="store_true", help="leave out slices without lung: fewer than 5%% "
                   "of the body's pixels in -950..-500 HU (body: filled region denser than -500 HU)")
    p.add_argument("--format", choices=("auto", "dicom", "nifti", "images"), default="auto", help="input kind")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="bad files (corrupt, not CT, other size or series): stop naming the file, or skip and count")
    p.add_argument("--series", help="SeriesInstanceUID to read when the folder holds several series")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast on the GPU (auto: bf16 for a checkpoint, none for TorchScript)")
    p.add_argument("--backend", help="operator backend (default: as trained)")
    p.add_argument("--top", type=int, default=6, help="slices in the Grad-CAM montage")
    p.add_argument("--no-cam", action="store_true", help="montage without Grad-CAM")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="TorchScript + ONNX + metadata.json of a trained model, for deployment")
    p.add_argument("checkpoint", help="a run folder (its best.pt) or a checkpoint file")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--no-onnx", action="store_true", help="TorchScript only")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad input (a missing folder, an unknown setting) reads better without a traceback;
        # MUTEX_ATTN_TRACEBACK=1 shows it, for when the error comes from deeper down.
        if os.environ.get("MUTEX_ATTN_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"mutex-attn {args.command}: error: {e}", file=sys.stderr)
        print("(MUTEX_ATTN_TRACEBACK=1 shows where it came from)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
