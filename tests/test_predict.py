"""Scan readers (DICOM, NIfTI, images), `mutex-attn predict` and `mutex-attn export`.

The DICOM files are written here with pydicom as real CT objects (file meta, Modality CT,
RescaleSlope / RescaleIntercept, ImagePositionPatient / ImageOrientationPatient); expected
pixel values are computed in the tests from the HU they were made from, not with the
package's own window function.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mutex_attn.cli import main
from mutex_attn.predict import (
    THRESHOLD_FILE,
    calibrate,
    choose_threshold,
    load_predictor,
    patient_decision,
    predict_scan,
)
from mutex_attn.scans import ScanError, has_lung, read_scan

needs_pydicom = pytest.mark.skipif(importlib.util.find_spec("pydicom") is None,
                                   reason="pydicom is not installed: pip install pydicom")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SERIES = "1.2.826.0.1.3680043.8.498.1"
STUDY = "1.2.826.0.1.3680043.8.498.2"
SIZE = 48


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a shared 2-core machine, two threads wait on each other whenever
    another process holds a core (a 32 px ResNet-50 forward then takes seconds, not 40 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lung_window(hu) -> np.ndarray:
    """The lung window written out: [-1250, 250] HU -> 0..255, rounded half up."""
    hu = np.clip(np.asarray(hu, dtype=np.float64), -1250.0, 250.0)
    return np.floor((hu + 1250.0) * 255.0 / 1500.0 + 0.5).astype(np.uint8)


def phantom(k: int, lungs: bool = True, size: int = SIZE) -> np.ndarray:
    """A chest-like slice in HU: air, a body of soft tissue, two lungs, and a marker square
    whose value (-400 + 30 k HU) tells the slice apart."""
    yy, xx = np.mgrid[:size, :size] / size
    hu = np.full((size, size), -1000.0)
    hu[((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.35) ** 2 <= 1] = 40.0
    if lungs:
        for cx in (0.32, 0.68):
            hu[((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.22) ** 2 <= 1] = -850.0
    hu[int(0.45 * size):int(0.55 * size), int(0.47 * size):int(0.53 * size)] = -400.0 + 30.0 * k
    return hu


def write_ct(path, hu, *, position, orientation=(1, 0, 0, 0, 1, 0), instance=1, series=SERIES,
             modality="CT", slope=1.0, intercept=-1024.0):
    """One CT slice as a DICOM Part 10 file."""
    pytest.importorskip("pydicom", reason="pydicom is not installed: pip install pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, series
    ds.PatientID = "SYNTHETIC"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 2.5
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
    ds.PixelData = np.round((hu - intercept) / slope).astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(folder, n=5, *, lungless=(), tilt_deg=30.0, size=SIZE):
    """n slices 2.5 mm apart along a tilted slice normal, with in-plane shifts that scramble
    their z order, shuffled file names and InstanceNumbers, and two rescalings. Returns the
    HU of the slices in true order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a = np.deg2rad(tilt_deg)
    row, col = np.array([1.0, 0, 0]), np.array([0, np.cos(a), np.sin(a)])
    normal = np.cross(row, col)
    shifts = [40.0, -30.0, 0.0, 25.0, -50.0, 10.0, -20.0, 35.0]
    rng = np.random.default_rng(1)
    names, instances = rng.permutation(n), rng.permutation(n) + 1
    origin = np.array([-120.0, -100.0, 50.0])
    volume = []
    for k in range(n):
        hu = phantom(k, lungs=k not in lungless, size=size)
        slope, intercept = (1.0, -1024.0) if k % 2 == 0 else (0.5, -1200.0)
        write_ct(folder / f"IM{names[k]:04d}.dcm", hu, position=origin + 2.5 * k * normal + shifts[k % 8] * col,
                 orientation=(*row, *col), instance=int(instances[k]), slope=slope, intercept=intercept)
        volume.append(hu)
    return volume


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------
@needs_pydicom
def test_ct_small_hu_and_window(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    from mutex_attn.scans import dicom_to_hu

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    # HU from the tags, by hand: the stored values are signed 16-bit little-endian
    assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 1
    raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(ds.Rows, ds.Columns)
    hu = raw.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(dicom_to_hu(ds), hu)
    assert hu.min() < -800 and hu.max() > 1000  # air and bone: the window clips both ends

    shutil.copy(path, tmp_path / "CT_small.dcm")
    for source in (path, tmp_path):  # the file itself, and a folder holding it
        scan = read_scan(source)
        assert scan.kind == "dicom" and len(scan) == 1
        np.testing.assert_array_equal(scan.slices[0].pixels, lung_window(hu))
        ipp, iop = np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float)
        assert scan.slices[0].position == pytest.approx(ipp @ np.cross(iop[:3], iop[3:]))


@needs_pydicom
def test_dicom_series_is_ordered_by_position_with_each_files_rescale(tmp_path):
    volume = write_series(tmp_path / "s", n=6)
    scan = read_scan(tmp_path / "s")
    assert scan.info["order"] == "ImagePositionPatient" and scan.skipped == []
    for k, (s, hu) in enumerate(zip(scan.slices, volume)):
        np.testing.assert_array_equal(s.pixels, lung_window(hu), err_msg=f"slice {k}")
    positions = [s.position for s in scan.slices]
    np.testing.assert_allclose(np.diff(positions), 2.5, atol=1e-3)


@needs_pydicom
def test_dicom_without_positions_falls_back_to_instance_number(tmp_path):
    import pydicom

    for k, inst in enumerate([3, 1, 2]):
        write_ct(tmp_path / f"a{k}.dcm", phantom(inst), position=(0, 0, 0), instance=inst)
    for p in tmp_path.iterdir():  # drop the geometry tags
        ds = pydicom.dcmread(p)
        del ds.ImagePositionPatient
        ds.save_as(p)
    scan = read_scan(tmp_path)
    assert scan.info["order"] == "InstanceNumber"
    for k, s in enumerate(scan.slices):
        np.testing.assert_array_equal(s.pixels, lung_window(phantom(k + 1)))


def _bad_file(kind: str, folder: Path) -> Path:
    if kind == "corrupt":
        p = folder / "IM9999.dcm"
        p.write_bytes(b"this is not a DICOM file" * 20)
    elif kind == "truncated":
        p = folder / "IM9999.dcm"
        write_ct(p, phantom(9), position=(0, 0, 99))
        p.write_bytes(p.read_bytes()[:-500])
    elif kind == "modality":
        p = folder / "IM9999.dcm"
        write_ct(p, phantom(9), position=(0, 0, 99), modality="MR")
    elif kind == "size":
        p = folder / "IM9999.dcm"
        write_ct(p, phantom(9, size=SIZE - 8), position=(0, 0, 99))
    else:  # a second series
        p = folder / "IM9999.dcm"
        write_ct(p, phantom(9), position=(0, 0, 99), series=SERIES + ".7")
    return p


@needs_pydicom
@pytest.mark.parametrize("kind", ["corrupt", "truncated", "modality", "size", "series"])
def test_bad_dicom_files_name_the_file_or_are_skipped(tmp_path, kind):
    volume = write_series(tmp_path, n=4, tilt_deg=0.0)
    bad = _bad_file(kind, tmp_path)
    with pytest.raises(ScanError, match=bad.name) as err:
        read_scan(tmp_path)
    if kind == "modality":
        assert "MR" in str(err.value)
    if kind == "series":
        assert "--series" in str(err.value)
    scan = read_scan(tmp_path, on_error="skip")
    assert [f for f, _ in scan.skipped] == [str(bad)]
    assert len(scan) == 4
    for s, hu in zip(scan.slices, volume):
        np.testing.assert_array_equal(s.pixels, lung_window(hu))
    if kind == "series":  # or ask for the other series by its UID
        assert len(read_scan(tmp_path, series=SERIES + ".7")) == 1


def test_nifti_volume(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    data = rng.integers(-1300, 400, size=(40, SIZE, 5)).astype(np.int16)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    affine[:3, 3] = (-20.0, -30.0, 100.0)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "vol.nii.gz")
    scan = read_scan(tmp_path / "vol.nii.gz")
    assert scan.kind == "nifti" and len(scan) == 5
    for k, s in enumerate(scan.slices):
        # training's orientation: np.rot90 of the array's slice
        np.testing.assert_array_equal(s.pixels, np.rot90(lung_window(data[..., k])))
        assert s.position == pytest.approx(100.0 + 2.5 * k)
        assert s.name == f"vol#{k}"
    # a volume stored already windowed (values in [0, 255]) is used as intensities
    grey = rng.integers(0, 256, size=(40, SIZE, 3)).astype(np.uint8)
    nib.save(nib.Nifti1Image(grey, affine), tmp_path / "grey.nii")
    scan = read_scan(tmp_path / "grey.nii")
    assert scan.info["intensity"] == "uint8"
    np.testing.assert_array_equal(scan.slices[2].pixels, np.rot90(grey[..., 2]))
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ScanError, match="broken.nii.gz"):
        read_scan(tmp_path / "broken.nii.gz")


def test_image_folder_in_natural_order(tmp_path):
    from PIL import Image

    for n in (10, 2, 1):
        Image.fromarray(np.full((SIZE, SIZE), n * 10, np.uint8), "L").save(tmp_path / f"s{n}.png")
    scan = read_scan(tmp_path)
    assert scan.kind == "images"
    assert [Path(s.name).name for s in scan.slices] == ["s1.png", "s2.png", "s10.png"]
    assert [int(s.pixels[0, 0, 0]) for s in scan.slices] == [10, 20, 100]
    (tmp_path / "s3.png").write_bytes(PNG_MAGIC + b"broken")
    with pytest.raises(ScanError, match="s3.png"):
        read_scan(tmp_path)
    scan = read_scan(tmp_path, on_error="skip")
    assert len(scan) == 3 and [Path(f).name for f, _ in scan.skipped] == ["s3.png"]


def test_missing_readers_say_what_to_install(tmp_path, monkeypatch):
    import sys

    (tmp_path / "a.dcm").write_bytes(b"x")
    (tmp_path / "v.nii.gz").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` now fails
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ScanError, match="pip install pydicom"):
        read_scan(tmp_path / "a.dcm")
    with pytest.raises(ScanError, match="pip install nibabel"):
        read_scan(tmp_path / "v.nii.gz")


def test_lung_check():
    from mutex_attn.data.synth_ct import simulate_patient

    _, slices = simulate_patient(0, label=1, size=64, slices_per_patient=2, masks=False)
    assert all(has_lung(lung_window(s["hu"])) for s in slices)
    assert has_lung(lung_window(phantom(0)))
    assert not has_lung(lung_window(phantom(0, lungs=False)))  # abdomen: all tissue
    assert not has_lung(lung_window(np.full((SIZE, SIZE), -1000.0)))  # air only


# --------------------------------------------------------------------------------------------
# Threshold logic
# --------------------------------------------------------------------------------------------
def test_choose_threshold_by_hand():
    y = [1, 1, 1, 1, 0, 0, 0]
    s = [0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1]
    got = choose_threshold(y, s, 0.75)  # 3 of 4 positives: the 3rd largest positive score
    assert got["threshold"] == 0.6 and got["sensitivity"] == 0.75
    assert got["specificity"] == pytest.approx(2 / 3)  # 0.7 >= 0.6 is a false positive
    assert choose_threshold(y, s, 1.0)["threshold"] == 0.3
    assert choose_threshold(y, s, 0.5)["threshold"] == 0.8
    assert choose_threshold(y, s, 0.74)["threshold"] == 0.6
    # 0.95 of 20 positives is 19, whatever floating point makes of 0.95 * 20
    pos = np.linspace(0.99, 0.04, 20)
    assert choose_threshold([1] * 20, pos, 0.95)["threshold"] == pytest.approx(pos[18])
    # ties: every positive at the threshold counts
    assert choose_threshold([1, 1, 1, 1], [0.5, 0.5, 0.5, 0.2], 0.5)["sensitivity"] == 0.75
    with pytest.raises(ValueError, match="positive"):
        choose_threshold([0, 0], [0.1, 0.2], 0.9)


def test_patient_decision_by_hand():
    d = patient_decision([0.9, 0.2, 0.3, 0.8], 0.5)
    assert d["probability"] == pytest.approx(0.55) and d["decision"] == "COVID"
    # a 2-2 vote is broken by the mean, as in evaluation
    assert d["majority_vote"]["positive_slices"] == 2 and d["majority_vote"]["decision"] == "COVID"
    d = patient_decision([0.9, 0.2, 0.3, 0.8], 0.6)
    assert not d["positive"] and d["majority_vote"]["decision"] == "non-COVID"
    assert patient_decision([0.5], 0.5)["positive"]  # >= threshold


# --------------------------------------------------------------------------------------------
# With a trained model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny MA-Net run (1 epoch of 2 steps on 32 px images; no validation during training,
    calibration loads the validation split itself)."""
    from mutex_attn.data.synth_ct import generate_dataset
    from mutex_attn.train import train

    root = tmp_path_factory.mktemp("predict")
    generate_dataset(root / "data", patients=12, slices_per_patient=2, size=SIZE, seed=0, progress=False)
    train(dict(data=str(root / "data"), img_size=32, batch_size=4, epochs=1, max_steps_per_epoch=2,
               workers=0, progress=False, clip_grad=1.0, val_split="", output=str(root / "run")),
          log=lambda *a: None)
    return root / "run"


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series") / "patient"
    write_series(folder, n=6, lungless=(5,))
    return folder


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["export", str(run), "--output", str(out)]) == 0
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_predict_end_to_end(run, series, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(series), "--checkpoint", str(run), "--output", str(out),
                 "--lung-only", "--no-progress", "--top", "4"]) == 0
    assert "COVID" in capsys.readouterr().out
    rows = read_csv(out / "predictions.csv")
    assert [int(r["index"]) for r in rows] == list(range(6))
    assert [r["lung"] for r in rows] == ["1"] * 5 + ["0"]  # the abdomen slice is left out
    assert rows[5]["prob_covid"] == "" and rows[5]["used"] == "0"
    probs = np.array([float(r["prob_covid"]) for r in rows[:5]])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"] == 0.5 and summary["threshold_source"] == "default"
    assert summary["patient"]["probability"] == pytest.approx(probs.mean(), abs=1e-6)
    assert summary["patient"]["positive"] == (probs.mean() >= 0.5)
    assert summary["majority_vote"]["positive_slices"] == int((probs >= 0.5).sum())
    assert summary["counts"] == {"slices": 6, "used": 5, "without_lung": 1, "files_skipped": 0}
    assert summary["model"] == "manet_resnet50" and summary["format"] == "dicom"
    assert len(summary["top_slices"]) == 4
    assert (out / "montage.png").read_bytes()[:8] == PNG_MAGIC
    # positions come out in order along the slice normal
    assert np.all(np.diff([float(r["position_mm"]) for r in rows]) > 0)


def test_cli_predict_errors_name_the_file(run, series, tmp_path, capsys):
    folder = tmp_path / "bad"
    shutil.copytree(series, folder)
    (folder / "IM0100.dcm").write_bytes(b"garbage" * 50)
    assert main(["predict", str(folder), "--checkpoint", str(run), "--output", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "IM0100.dcm" in capsys.readouterr().err
    assert main(["predict", str(folder), "--checkpoint", str(run), "--output", str(tmp_path / "o"),
                 "--no-progress", "--on-error", "skip", "--no-cam", "--threshold", "0.25"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["counts"]["files_skipped"] == 1 and summary["counts"]["used"] == 6
    assert summary["skipped_files"][0]["file"].endswith("IM0100.dcm")
    assert summary["threshold"] == 0.25 and summary["threshold_source"] == "--threshold"
    assert summary["patient"]["positive"] == (summary["patient"]["probability"] >= 0.25)


def test_target_sensitivity_calibrates_on_validation(run, series, tmp_path):
    from torch.utils.data import DataLoader

    from mutex_attn.data.datasets import SliceDataset, load_dataset
    from mutex_attn.data.transforms import eval_transform
    from mutex_attn.train import load_checkpoint, model_from_checkpoint

    own = tmp_path / "run"  # a run folder of our own: threshold.json must not leak to other tests
    own.mkdir()
    for name in ("best.pt", "config.yaml"):
        try:
            os.link(run / name, own / name)
        except OSError:
            shutil.copy(run / name, own / name)
    record = calibrate(own, 0.95, workers=0, progress=False, log=lambda *a: None)
    saved = json.loads((own / THRESHOLD_FILE).read_text())
    assert saved["method"] == "target_sensitivity" and saved["target_sensitivity"] == 0.95
    assert saved["level"] == "patient" and saved["split"] == "val"

    # by hand: validation probabilities, patient means, the smallest positive patient mean
    model, config = model_from_checkpoint(load_checkpoint(own / "best.pt"))
    val = load_dataset(config.data, "val", seed=config.seed)
    ds = SliceDataset(val, transform=eval_transform(config.img_size))
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(x), 1)[:, 1] for x, _ in DataLoader(ds, batch_size=8)]).numpy()
    means = {p: probs[[s.patient == p for s in val]].mean() for p in {s.patient for s in val}}
    positive = [m for p, m in means.items() if any(s.label == 1 and s.patient == p for s in val)]
    assert record["threshold"] == pytest.approx(min(positive), abs=1e-6)  # 1 positive patient here
    assert saved["threshold"] == pytest.approx(record["threshold"])

    # predict now uses it (--threshold would override it: test_cli_predict_errors_name_the_file)
    summary = predict_scan(series, own, output=str(tmp_path / "o"), progress=False, cam=False, log=lambda *a: None)
    assert summary["threshold"] == pytest.approx(saved["threshold"])
    assert summary["threshold_source"].endswith(THRESHOLD_FILE)
    # calibration only, from the command line
    (own / THRESHOLD_FILE).unlink()
    assert main(["predict", "--checkpoint", str(own), "--target-sensitivity", "1.0", "--no-progress"]) == 0
    assert json.loads((own / THRESHOLD_FILE).read_text())["target_sensitivity"] == 1.0


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_torchscript_and_onnx_parity(run, exported):
    from mutex_attn.train import load_checkpoint, model_from_checkpoint

    meta = json.loads((exported / "metadata.json").read_text())
    assert meta["model"] == "manet_resnet50" and meta["class_names"] == ["non-COVID", "COVID"]
    assert meta["preprocessing"]["img_size"] == 32 and meta["preprocessing"]["window_hu"] == [-1250.0, 250.0]
    assert meta["threshold"] == 0.5 and meta["source_checkpoint"].endswith("best.pt")
    model, _ = model_from_checkpoint(load_checkpoint(run / "best.pt"))
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x)
        ts = torch.jit.load(str(exported / "model.ts"))
        np.testing.assert_allclose(ts(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: ONNX parity not checked")
    assert meta["files"]["onnx"] == "model.onnx"
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], want.numpy(), rtol=1e-4, atol=1e-4)
    onnx = pytest.importorskip("onnx")
    props = {p.key: p.value for p in onnx.load(str(exported / "model.onnx")).metadata_props}
    assert json.loads(props["threshold"]) == 0.5


def test_predict_with_the_export_gives_the_same_probabilities(run, exported, series, tmp_path):
    ckpt, exp = load_predictor(run), load_predictor(exported)
    a = predict_scan(series, ckpt, output=str(tmp_path / "a"), progress=False, cam=False, log=lambda *a: None)
    b = predict_scan(series, exp, output=str(tmp_path / "b"), progress=False, top=2, log=lambda *a: None)
    assert b["model_kind"] == "torchscript" and b["threshold"] == a["threshold"]
    pa = [float(r["prob_covid"]) for r in read_csv(tmp_path / "a" / "predictions.csv")]
    pb = [float(r["prob_covid"]) for r in read_csv(tmp_path / "b" / "predictions.csv")]
    np.testing.assert_allclose(pb, pa, atol=1e-5)
    assert b["patient"]["probability"] == pytest.approx(a["patient"]["probability"], abs=1e-5)
    assert (tmp_path / "b" / "montage.png").read_bytes()[:8] == PNG_MAGIC  # Grad-CAM via forward_cam
    # Grad-CAM of the traced model: the maps of pytorch-grad-cam on the checkpoint (on 128 px
    # images: at 32 px the last stage is 1 x 1 and every map is flat). A model trained for a
    # step may score COVID negatively everywhere (all maps 0): then flip its COVID weights.
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    m_ckpt, m_exp = ckpt.grad_cam(x), exp.grad_cam(x)
    if m_ckpt.max() == 0:
        with torch.no_grad():
            ckpt.model.head.weight[1].neg_()
            exp.model.model.fc.weight[1].neg_()
        m_ckpt, m_exp = ckpt.grad_cam(x), exp.grad_cam(x)
    assert m_exp.shape == m_ckpt.shape == (2, 128, 128)
    assert m_ckpt.max() > 0.5
    np.testing.assert_allclose(m_exp, m_ckpt, atol=0.03)  # cv2's and torch's bilinear resize


def test_predict_nifti_and_image_folder(run, tmp_path):
    import nibabel as nib
    from PIL import Image

    predictor = load_predictor(run)  # loaded once for several scans
    volume = np.stack([phantom(k) for k in range(3)], axis=-1).astype(np.int16)
    nib.save(nib.Nifti1Image(np.rot90(volume, -1).copy(), np.eye(4)), tmp_path / "vol.nii.gz")
    a = predict_scan(tmp_path / "vol.nii.gz", predictor, output=str(tmp_path / "a"), progress=False,
                     lung_only=True, top=1, log=lambda *a: None)
    assert a["format"] == "nifti" and a["counts"]["used"] == 3
    images = tmp_path / "images"
    images.mkdir()
    for k in range(3):  # the same slices as 8-bit PNGs: the same probabilities
        Image.fromarray(lung_window(phantom(k)), "L").save(images / f"{k}.png")
    b = predict_scan(images, predictor, output=str(tmp_path / "b"), progress=False, cam=False,
                     threshold=0.0, log=lambda *a: None)
    assert b["format"] == "images" and b["threshold"] == 0.0 and b["patient"]["positive"]
    np.testing.assert_allclose(b["patient"]["probability"], a["patient"]["probability"], atol=1e-6)


def test_benchmark_smoke():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_predict

    row = bench_predict.main(["--slices", "3", "--size", "48", "--img-size", "32", "--runs", "1",
                              "--model", "resnet50", "--no-csv", "--no-cam"])
    assert row["slices"] == 3 and row["slices_per_s"] > 0 and row["amp"] == "none"
