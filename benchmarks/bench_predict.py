"""Prediction benchmark: `mutex-attn predict` on a synthetic CT series, reading included.

Writes a DICOM series of --slices synthetic chest-CT slices (`mutex_attn.data.synth_ct`,
--size px, HU stored as int16 with RescaleIntercept -1024, files in shuffled order), builds an
untrained checkpoint of --model at --img-size (the weights do not change the speed), then
times `mutex_attn.predict.predict_scan` end to end, as the command runs it: reading and
ordering the series, windowing, preprocessing, the model in batches, predictions.csv,
summary.json and the Grad-CAM montage of the top 6 slices. Each of --runs runs is timed; the
row keeps the median and the best, and the split of the median run into loading the
checkpoint (load_s), reading the series (read_s), preprocessing and the model's forward passes
(model_s), and the rest (rest_s: Grad-CAM montage, predictions.csv, summary.json).

    python benchmarks/bench_predict.py                      # 300 slices, 224 px, CPU
    python benchmarks/bench_predict.py --slices 40 --quick  # a smoke run
    python benchmarks/bench_predict.py --amp bf16                # CPU with bf16 units
    python benchmarks/bench_predict.py --device cuda --batch-size 64

The issue's goal on the 2-core development VM: the whole 300-slice series in <= 30 s.
Rows go to --csv (default benchmarks/results/predict.csv) with bench_ops.py's metadata.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ops  # noqa: E402  (metadata and CSV helpers)

from mutex_attn.models import MODEL_NAMES, create_model  # noqa: E402
from mutex_attn.train import TrainConfig  # noqa: E402

COLUMNS = [
    "device", "torch", "commit", "model", "slices", "size", "img_size", "batch", "amp", "lung_only", "cam",
    "runs", "median_s", "best_s", "slices_per_s", "load_s", "read_s", "model_s", "rest_s", "goal_s", "met_goal",
    "threads", "device_type", "device_detail", "allocator", "python", "git_dirty", "timestamp",
]
GOAL_S = 30.0  # the goal for 300 slices on the 2-core VM


def write_series(folder: Path, slices: int, size: int, seed: int = 0) -> None:
    """A synthetic CT series as DICOM files named in shuffled order (the reader must sort)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    from mutex_attn.data.synth_ct import simulate_patient

    folder.mkdir(parents=True, exist_ok=True)
    _, rendered = simulate_patient(0, seed=seed, label=1, size=size, slices_per_patient=slices, masks=False)
    series, study = generate_uid(), generate_uid()
    names = np.random.default_rng(seed).permutation(slices)
    for k, s in enumerate(rendered):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{names[k]:05d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", study, series
        ds.PatientID, ds.InstanceNumber = "SYNTHETIC", k + 1
        ds.ImagePositionPatient = [0.0, 0.0, -1.25 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [350.0 / size] * 2, 1.25
        ds.Rows, ds.Columns = size, size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.clip(np.round(s["hu"] + 1024), -32768, 32767).astype(np.int16).tobytes()
        ds.save_as(folder / f"{names[k]:05d}.dcm", enforce_file_format=True)


def untrained_run(folder: Path, model: str, img_size: int) -> Path:
    """A run folder whose best.pt holds freshly initialised weights (eval BatchNorm: identity)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(model=model, img_size=img_size)
    torch.manual_seed(0)
    net = create_model(model)
    torch.save({"version": 1, "config": config.to_dict(), "model": net.state_dict(), "epoch": 0},
               folder / "best.pt")
    return folder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=224, help="DICOM slice size in pixels")
    p.add_argument("--img-size", type=int, default=224, help="the model's input size")
    p.add_argument("--model", default="manet_resnet50", choices=MODEL_NAMES)
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto", choices=("auto", "none", "bf16"),
                   help="as predict's --amp (auto: bf16 on a GPU, float32 on the CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--lung-only", action="store_true")
    p.add_argument("--no-cam", action="store_true")
    p.add_argument("--quick", action="store_true", help="one run, 64 px model input")
    p.add_argument("--csv", default=str(Path(__file__).parent / "results" / "predict.csv"))
    p.add_argument("--no-csv", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from mutex_attn.predict import predict_scan

    args = parse_args(argv)
    if args.quick:
        args.runs, args.img_size = 1, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        write_series(tmp / "series", args.slices, args.size)
        run = untrained_run(tmp / "run", args.model, args.img_size)
        print(f"wrote {args.slices} DICOM slices of {args.size} px and a {args.model} checkpoint "
              f"in {time.perf_counter() - t:.1f} s")
        times, parts = [], []
        for r in range(args.runs):
            t = time.perf_counter()
            summary = predict_scan(tmp / "series", run, output=str(tmp / f"out{r}"), device=args.device,
                                   batch_size=args.batch_size, lung_only=args.lung_only, amp=args.amp,
                                   cam=not args.no_cam, progress=False, log=lambda *a: None)
            times.append(time.perf_counter() - t)
            parts.append(summary["seconds"])
            sec = summary["seconds"]
            print(f"run {r + 1}: {times[-1]:.2f} s ({args.slices / times[-1]:.1f} slices/s; load "
                  f"{sec['load_model']:.2f} s, read {sec['read']:.2f} s, model {sec['model']:.2f} s)")
    median = statistics.median(times)
    mid = parts[times.index(sorted(times)[len(times) // 2])]
    device = torch.device(args.device)
    row = {
        **bench_ops.metadata(device), "model": args.model, "slices": args.slices, "size": args.size,
        "img_size": args.img_size, "batch": args.batch_size, "amp": summary["amp"] or "none", "lung_only": args.lung_only,
        "cam": not args.no_cam, "runs": args.runs, "median_s": round(median, 3), "best_s": round(min(times), 3),
        "slices_per_s": round(args.slices / median, 2), "load_s": round(mid["load_model"], 3),
        "read_s": round(mid["read"], 3), "model_s": round(mid["model"], 3),
        "rest_s": round(median - mid["load_model"] - mid["read"] - mid["model"], 3),
        "goal_s": GOAL_S * args.slices / 300, "met_goal": median <= GOAL_S * args.slices / 300,
    }
    print(f"median {median:.2f} s for {args.slices} slices = {row['slices_per_s']} slices/s "
          f"(goal: 300 slices in {GOAL_S:.0f} s) on {row['device']}")
    if not args.no_csv:
        bench_ops.append_csv(args.csv, [row], COLUMNS)
    return row


if __name__ == "__main__":
    main()
