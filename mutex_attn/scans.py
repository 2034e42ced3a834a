"""Readers for new scans to diagnose: a DICOM series, a NIfTI volume, or a folder of slice images.

    scan = read_scan("patient_042/")          # format detected: dicom | nifti | images
    scan.slices[k].rgb()                      # the slice as the model saw its training images
    scan.skipped                              # [(file, why)] with on_error="skip"

Every reader gives the slices in scan order as 8-bit lung-windowed images, exactly as the
training data were made (`mutex_attn.data.datasets.window_hu`: [-1250, 250] HU → 0..255):

``dicom`` — a folder of one CT series (files ``*.dcm``, ``*.dicom``, ``*.ima`` or without a
  suffix; other files such as ``*.txt`` and ``DICOMDIR`` are ignored), or a single DICOM file.
  Headers are read first (no pixel data) to check every file and to order the slices: by
  ImagePositionPatient projected on the slice normal (the cross product of the row and column
  directions of ImageOrientationPatient), ascending (axial slices: feet to head), else by
  InstanceNumber, never by file name (only when neither tag is there, with a note in
  ``scan.info["order"]``). Pixels become HU with
  each file's RescaleSlope / RescaleIntercept (default 1 / 0). A file that is not DICOM or
  whose pixels do not decode, a Modality other than CT, a slice size or orientation other than
  the series' own (the most common one), and files of a second series are errors that name the
  file; with ``on_error="skip"`` they are left out and listed in ``scan.skipped`` (of several
  series the one with the most files is kept, or the one asked for with ``series=UID``).
  Multi-frame (enhanced) CT objects are not supported. Needs pydicom (``pip install pydicom``).
``nifti`` — one ``.nii`` / ``.nii.gz`` volume; axial slices are the last axis and are shown
  as in the training loader (``np.rot90``); a volume whose values all lie in [0, 255] is taken
  as already windowed, as in training. Needs nibabel (``pip install nibabel``).
``images`` — a folder of PNG / JPG / BMP / TIFF slices, in natural name order (``s2`` before
  ``s10``), made RGB as in training (`mutex_attn.data.datasets.to_rgb`). Unreadable images are
  errors, or skipped with ``on_error="skip"``.

`has_lung` is the ``--lung-only`` test of `mutex_attn.predict`: it recovers HU from the
8-bit window, takes the body as the filled-in region of pixels denser than -500 HU, and asks
that at least 5% of the body be lung-like air (-950..-500 HU) and the body cover at least 5%
of the image. It is meant for whole cross-sections (scanner output): an image cropped inside
the chest wall has no enclosed lungs and fails it.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mutex_attn.data.datasets import (
    IMAGE_SUFFIXES,
    LUNG_WINDOW,
    DatasetError,
    as_3d,
    intensity_of,
    nifti_stem,
    stored_array,
    volume_slice_to_rgb,
    to_rgb,
    window_hu,
)

FORMATS = ("auto", "dicom", "nifti", "images")
ON_ERROR = ("raise", "skip")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
LUNG_HU = (-950.0, -500.0)  # lung parenchyma, aerated (emphysema below, dense lesions above)
BODY_HU = -500.0  # denser than this: soft tissue and bone of the body wall
LUNG_MIN_FRACTION = 0.05  # of the body's pixels
BODY_MIN_FRACTION = 0.05  # of the image's pixels


class ScanError(DatasetError):
    """A scan that cannot be read as asked; the message names the file."""


@dataclass
class ScanSlice:
    """One slice: `pixels` is uint8, [H, W] (grey) or [H, W, 3] (RGB images)."""

    name: str  # file path, or "<volume>#<k>" for NIfTI
    pixels: np.ndarray
    position: float | None = None  # mm along the scan axis (DICOM, NIfTI); None for images

    def rgb(self) -> Image.Image:
        """The RGB PIL image the model's transform expects (grey repeated, as `to_rgb` does)."""
        a = self.pixels
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        return Image.fromarray(np.ascontiguousarray(a), "RGB")

    def grey(self) -> np.ndarray:
        return self.pixels if self.pixels.ndim == 2 else self.pixels.mean(axis=2).round().astype(np.uint8)


@dataclass
class Scan:
    """The slices of one scan in scan order, with what was left out and how it was read."""

    kind: str  # dicom | nifti | images
    source: str
    slices: list[ScanSlice]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.slices)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def read_scan(path, fmt: str = "auto", *, on_error: str = "raise", series: str | None = None,
              progress: bool = False) -> Scan:
    """Read a DICOM series folder / file, a NIfTI volume or an image folder (see module doc)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown scan format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r}; choose one of {', '.join(ON_ERROR)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no scan at {path}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "dicom":
        scan = read_dicom_series(path, on_error=on_error, series=series, progress=progress)
    elif fmt == "nifti":
        scan = read_nifti(path)
    else:
        scan = read_image_folder(path, on_error=on_error, progress=progress)
    if not scan.slices:
        raise ScanError(f"{path}: no readable slices (skipped {len(scan.skipped)} file(s)"
                        + (f", e.g. {scan.skipped[0][0]}: {scan.skipped[0][1]}" if scan.skipped else "") + ")")
    return scan


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def _is_dicom_candidate(p: Path) -> bool:
    """Files that may be DICOM: a DICOM suffix, none at all (scanners often write none), or a
    numeric one (files named by their UID)."""
    if p.name.startswith(".") or p.name.upper() == "DICOMDIR":
        return False
    return p.suffix.lower() in DICOM_SUFFIXES or (p.suffix == "" or p.suffix[1:].isdigit())


def _has_dicom_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def detect_format(path) -> str:
    """dicom | nifti | images for a file or folder; an error says what was found."""
    path = Path(path)
    if path.is_file():
        if _is_nifti(path):
            return "nifti"
        if path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_magic(path):
            return "dicom"
        raise ScanError(f"{path}: not a NIfTI volume (.nii, .nii.gz) or a DICOM file; give a "
                        "DICOM series folder, a NIfTI volume or a folder of slice images")
    files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    niftis = [p for p in files if _is_nifti(p)]
    dicoms = [p for p in files if _is_dicom_candidate(p)]
    kinds = [k for k, found in (("dicom", dicoms), ("nifti", niftis), ("images", images)) if found]
    if len(kinds) == 1 and kinds[0] != "nifti":
        return kinds[0]
    if not kinds:
        raise ScanError(f"{path}: no DICOM files, NIfTI volume or slice images in this folder")
    if kinds == ["nifti"]:
        raise ScanError(f"{path} is a folder of NIfTI volumes ({', '.join(p.name for p in niftis[:3])}"
                        f"{', ...' if len(niftis) > 3 else ''}): give one volume file")
    counts = ", ".join(f"{len(v)} {k}" for k, v in (("DICOM", dicoms), ("NIfTI", niftis), ("image", images)) if v)
    raise ScanError(f"{path} holds several kinds of files ({counts}); pass --format dicom|nifti|images")


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------
def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise ScanError("reading DICOM needs pydicom: pip install pydicom") from None
    return pydicom


def dicom_to_hu(ds) -> np.ndarray:
    """Hounsfield units of a single-frame DICOM dataset: stored value · RescaleSlope +
    RescaleIntercept (1 and 0 when absent), as float32."""
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return ds.pixel_array.astype(np.float32) * np.float32(slope) + np.float32(intercept)


@dataclass
class _Header:
    path: Path
    series: str
    rows: int
    cols: int
    orientation: np.ndarray | None  # 6 direction cosines
    position: np.ndarray | None  # 3 coordinates (mm)
    instance: int | None


def _floats(value, n: int) -> np.ndarray | None:
    try:
        a = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return a if a.shape == (n,) and np.isfinite(a).all() else None


def _read_header(pydicom, p: Path) -> _Header:
    """A file's header (no pixel data); ValueError with the reason when it is unusable."""
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
    except Exception as exc:  # InvalidDicomError, EOFError, struct / value errors ...
        raise ValueError(f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    modality = str(ds.get("Modality", "") or "").upper()
    if modality != "CT":
        raise ValueError(f"modality {modality or 'missing'}, not CT")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"a multi-frame object ({frames} frames); only single-frame CT slices are supported")
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError("no image (Rows / Columns missing)")
    number = ds.get("InstanceNumber", None)
    try:
        instance = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        instance = None
    iop = _floats(ds.get("ImageOrientationPatient", None) or (), 6)
    ipp = _floats(ds.get("ImagePositionPatient", None) or (), 3)
    return _Header(p, str(ds.get("SeriesInstanceUID", "") or ""), int(ds.Rows), int(ds.Columns), iop, ipp, instance)


class _Problems:
    """Raise on the first bad file, or collect (file, reason) pairs when skipping."""

    def __init__(self, on_error: str, what: str):
        self.on_error, self.what, self.items = on_error, what, []

    def __call__(self, path, reason: str) -> None:
        if self.on_error == "raise":
            raise ScanError(f"{path}: {reason} (--on-error skip leaves such files out of the {self.what})")
        self.items.append((str(path), reason))


def read_dicom_series(path, *, on_error: str = "raise", series: str | None = None,
                      progress: bool = False) -> Scan:
    """The slices of one CT series (a folder of files, or one file), ordered along the patient."""
    from tqdm.auto import tqdm

    pydicom = _pydicom()
    path = Path(path)
    files = [path] if path.is_file() else [p for p in sorted(path.iterdir()) if p.is_file() and _is_dicom_candidate(p)]
    if not files:
        raise ScanError(f"{path}: no DICOM files (*.dcm, *.dicom, *.ima or without suffix)")
    bad = _Problems(on_error, "series")

    headers: list[_Header] = []
    for p in tqdm(files, desc="read headers", disable=not progress, leave=False, dynamic_ncols=True):
        try:
            headers.append(_read_header(pydicom, p))
        except ValueError as exc:
            bad(p, str(exc))
    headers = _one_series(headers, series, bad, path)
    headers = _consistent_geometry(headers, bad)
    headers, positions, order = _sort_slices(headers)

    slices = []
    for h, pos in tqdm(list(zip(headers, positions)), desc="read pixels", disable=not progress,
                       leave=False, dynamic_ncols=True):
        try:
            ds = pydicom.dcmread(h.path)
            hu = dicom_to_hu(ds)
            if hu.shape != (h.rows, h.cols):
                raise ValueError(f"pixel data of shape {hu.shape}, the header says {(h.rows, h.cols)}")
        except Exception as exc:  # truncated or compressed pixel data without a decoder, ...
            bad(h.path, f"pixel data do not decode ({type(exc).__name__}: {exc})")
            continue
        slices.append(ScanSlice(str(h.path), window_hu(hu), pos))
    info = {"series_uid": headers[0].series if headers else None, "order": order, "files": len(files),
            "rows": headers[0].rows if headers else None, "columns": headers[0].cols if headers else None}
    return Scan("dicom", str(path), slices, bad.items, info)


def _one_series(headers: list[_Header], wanted: str | None, bad: _Problems, folder: Path) -> list[_Header]:
    counts = Counter(h.series for h in headers)
    if wanted is not None:  # the other series were not asked for: not problems
        if wanted not in counts:
            raise ScanError(f"{folder}: no series {wanted}; found " + ", ".join(f"{s} ({n} files)" for s, n in counts.items()))
        return [h for h in headers if h.series == wanted]
    if len(counts) <= 1:
        return headers
    keep = counts.most_common(1)[0][0]
    if bad.on_error == "raise":
        listing = "; ".join(f"{s or '(no SeriesInstanceUID)'}: {n} files, e.g. "
                            f"{next(h.path.name for h in headers if h.series == s)}"
                            for s, n in counts.most_common())
        raise ScanError(f"{folder} holds {len(counts)} series ({listing}); pick one with --series UID, "
                        "or --on-error skip to keep the largest")
    for h in headers:
        if h.series != keep:
            bad(h.path, f"another series ({h.series or 'no SeriesInstanceUID'}) than the one read ({keep})")
    return [h for h in headers if h.series == keep]


def _consistent_geometry(headers: list[_Header], bad: _Problems) -> list[_Header]:
    """Keep the slices of the series' most common size and orientation; others are problems."""
    if not headers:
        return headers
    size = Counter((h.rows, h.cols) for h in headers).most_common(1)[0][0]
    kept = []
    for h in headers:
        if (h.rows, h.cols) != size:
            bad(h.path, f"slice size {h.rows}x{h.cols} differs from the series' {size[0]}x{size[1]}")
        else:
            kept.append(h)
    oriented = [h for h in kept if h.orientation is not None]
    if oriented:
        key = Counter(tuple(np.round(h.orientation, 3)) for h in oriented).most_common(1)[0][0]
        ref = np.array(key)
        out = []
        for h in kept:
            # 1e-2: direction cosines are stored rounded; a localizer differs by ~1
            if h.orientation is not None and np.abs(h.orientation - ref).max() > 1e-2:
                bad(h.path, "slice orientation (ImageOrientationPatient) differs from the series'")
            else:
                out.append(h)
        kept = out
    return kept


def _sort_slices(headers: list[_Header]) -> tuple[list[_Header], list[float | None], str]:
    """Order along the slice normal; else by InstanceNumber; else by file name (noted)."""
    if not headers:
        return headers, [], "none"
    ref = next((h.orientation for h in headers if h.orientation is not None), None)
    if ref is not None and all(h.position is not None for h in headers):
        normal = np.cross(ref[:3], ref[3:])
        normal /= np.linalg.norm(normal) or 1.0
        pos = [float(np.dot(h.position, normal)) for h in headers]
        # Ties (duplicate positions) keep InstanceNumber order, then file name.
        idx = sorted(range(len(headers)), key=lambda i: (pos[i], headers[i].instance or 0, headers[i].path.name))
        return [headers[i] for i in idx], [pos[i] for i in idx], "ImagePositionPatient"
    if all(h.instance is not None for h in headers):
        idx = sorted(range(len(headers)), key=lambda i: (headers[i].instance, headers[i].path.name))
        return [headers[i] for i in idx], [None] * len(headers), "InstanceNumber"
    idx = sorted(range(len(headers)), key=lambda i: _natural_key(headers[i].path.name))
    return [headers[i] for i in idx], [None] * len(headers), "file name (no position or instance number tags)"


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------
def read_nifti(path) -> Scan:
    """The axial slices of one volume, oriented and windowed as the training loader does."""
    try:
        import nibabel as nib
    except ImportError:
        raise ScanError("reading NIfTI needs nibabel: pip install nibabel") from None
    path = Path(path)
    try:
        img = nib.load(str(path))
        raw, slope, inter = stored_array(img)  # read once, in the stored dtype (int16 stays int16)
        raw = as_3d(raw, path)
    except DatasetError as exc:
        raise ScanError(str(exc)) from None
    except Exception as exc:
        raise ScanError(f"{path}: not a readable NIfTI volume ({type(exc).__name__}: {exc})") from None
    # Training's rule, from the whole volume's range: values all in [0, 255] = already windowed.
    lo, hi = float(np.nanmin(raw)) * slope + inter, float(np.nanmax(raw)) * slope + inter
    intensity = intensity_of(min(lo, hi), max(lo, hi))
    # Position of slice k: the world coordinate of voxel (0, 0, k) along the slice axis.
    axis = img.affine[:3, 2]
    unit = axis / (np.linalg.norm(axis) or 1.0)
    origin, step = float(np.dot(img.affine[:3, 3], unit)), float(np.linalg.norm(axis))
    stem = nifti_stem(path)
    slices = []
    for k in range(raw.shape[2]):
        values = raw[:, :, k].astype(np.float32) * np.float32(slope) + np.float32(inter)
        grey = np.asarray(volume_slice_to_rgb(values, intensity))[..., 0]
        slices.append(ScanSlice(f"{stem}#{k}", np.ascontiguousarray(grey), origin + k * step))
    return Scan("nifti", str(path), slices, [], {"intensity": intensity, "shape": list(raw.shape)})


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------
def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def read_image_folder(path, *, on_error: str = "raise", progress: bool = False) -> Scan:
    """The images of a folder in natural name order, as RGB like the training images."""
    from tqdm.auto import tqdm

    path = Path(path)
    if not path.is_dir():
        raise ScanError(f"{path}: an image scan is a folder of slice images")
    files = sorted((p for p in path.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: _natural_key(p.name))
    if not files:
        raise ScanError(f"{path}: no slice images ({', '.join(IMAGE_SUFFIXES)})")
    bad = _Problems(on_error, "scan")
    slices = []
    for p in tqdm(files, desc="read images", disable=not progress, leave=False, dynamic_ncols=True):
        try:
            with Image.open(p) as im:
                im.load()
                rgb = np.array(to_rgb(im))
        except Exception as exc:
            bad(p, f"not a readable image ({type(exc).__name__}: {exc})")
            continue
        slices.append(ScanSlice(str(p), rgb, None))
    return Scan("images", str(path), slices, bad.items, {"files": len(files)})


# --------------------------------------------------------------------------------------------
# Lung check
# --------------------------------------------------------------------------------------------
def lung_fraction(grey: np.ndarray, window: tuple[float, float] = LUNG_WINDOW) -> tuple[float, float]:
    """(share of the body that is lung-like air, share of the image that is body) of a
    lung-windowed uint8 slice. HU are recovered from the window (about 6 HU per grey level)."""
    from scipy.ndimage import binary_fill_holes

    g = np.asarray(grey)
    step = max(1, max(g.shape) // 128)  # the check needs no more than ~128 px
    g = g[::step, ::step].astype(np.float32)
    low, high = window
    hu = low + g * np.float32((high - low) / 255.0)
    body = binary_fill_holes(hu > BODY_HU)
    lung = body & (hu >= LUNG_HU[0]) & (hu <= LUNG_HU[1])
    n_body = int(body.sum())
    return (lung.sum() / n_body if n_body else 0.0), n_body / g.size


def has_lung(grey: np.ndarray, window: tuple[float, float] = LUNG_WINDOW) -> bool:
    """The `--lung-only` test (module doc): enough lung-like air inside a large enough body."""
    lung, body = lung_fraction(grey, window)
    return bool(lung >= LUNG_MIN_FRACTION and body >= BODY_MIN_FRACTION)
