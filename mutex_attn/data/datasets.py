"""Loaders for the public COVID-19 CT datasets used by the MA-Net paper.

Every loader returns a list of `Slice` records (an image file, or one axial slice of a NIfTI
volume, with its label and patient id); `SliceDataset` turns such a list into a torch
`Dataset` of (RGB PIL image or transform(image), label). Labels: 1 = COVID, 0 = non-COVID.

    slices = load_dataset("data/COVID-CT", "train")          # kind="auto" → "covid-ct"
    train = SliceDataset(slices, transform=my_transform)

Layouts (`kind`):

``covid-ct`` — UCSD-AI4H COVID-CT (also what the project's synthetic generator writes)::

    Images-processed/CT_COVID/*.png|jpg      Images-processed/CT_NonCOVID/*.png|jpg
    Data-split/COVID/{train,val,test}CT_COVID.txt
    Data-split/NonCOVID/{train,val,test}CT_NonCOVID.txt      (one file name a line)
    COVID-CT-MetaInfo.xlsx|.csv      (columns "File name", "Patient ID")
    NonCOVID-CT-MetaInfo.csv|.xlsx   (columns "image name", "patient id")

  The metadata files are looked for in the root, ``Data-split/`` and ``Images-processed/``.
  Patient ids are namespaced by class ("covid/<id>", "noncovid/<id>"); an image with no
  metadata row is its own patient ("covid/<file stem>", one warning counts them). Whatever
  split is loaded, the three official splits are checked not to share a patient. "all" is the
  union of the three split files.

``sars-cov-2`` — Soares et al. SARS-CoV-2 CT-scan: ``COVID/*.png`` and ``non-COVID/*.png``.
  No patient ids: each image is its own patient, and train/val/test are drawn at random per
  image, stratified by class, from `seed`. Slices of one patient then land in both train and
  test, so scores are optimistic; a `UserWarning` says so.

``nifti`` — COVID-19 CT Lung and Infection Segmentation (Ma et al., Zenodo 3757476)::

    COVID-19-CT-Seg_20cases/*.nii.gz   (or the volumes in the root, or any one folder of volumes)
    Infection_Mask/*.nii.gz            Lung_Mask/*.nii.gz

  A mask has the volume's file name, or the same name once the decorations of the real
  release are dropped: ``coronacases_org_001`` ↔ ``coronacases_001`` and
  ``radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm`` ↔ ``radiopaedia_4_85506_1`` (that is
  how Zenodo / Kaggle name them), also ``<name>_mask`` and the like. Axial slices are the last
  array axis. A slice is COVID (1) when its infection mask is non-empty, non-COVID (0) when its
  lung mask is non-empty and its infection mask empty; slices without lung are not used. One
  volume = one patient (id = file name without .nii/.nii.gz); train/val/test are drawn per
  volume from `seed` (at least one volume each, so at least 3 volumes are needed).

  Image of a slice: ``window_hu`` (lung window [-1250, 250] HU → [0, 255]), then
  ``np.rot90`` (the array's second axis runs bottom → top of the image, its first axis
  left → right: for the usual RAS-like storage the anterior is up), grey → RGB. A volume whose
  values all lie in [0, 255] is taken as already windowed (some radiopaedia volumes are stored
  that way): its values are used as intensities, only rounded and clipped. This is decided per
  volume from the whole volume's min and max at load time and recorded in `Slice.intensity`.
  Slices are read lazily, one at a time (``img.dataobj[..., k]``); the dataset keeps the
  headers of the last few volumes open (an LRU). Random access into ``.nii.gz`` still
  decompresses up to the slice; decompress the volumes to ``.nii`` (or install
  ``indexed_gzip``) for fast shuffled reading.

``folder`` — any ``COVID/`` + ``NonCOVID/`` folder pair (also ``CT_COVID``/``CT_NonCOVID``,
  ``covid``/``non-covid``/``noncovid``/``non_covid``, any case). With ``train/``, ``val/``
  and ``test/`` subfolders, each holding the two class folders, those are the splits;
  otherwise a random split as for sars-cov-2. Images directly in a class folder are their own
  patients (leak warning); images in subfolders of a class folder belong to the patient named
  by that subfolder, and then random splits are drawn per patient (no leak).

Images: PNG/JPG/BMP/TIFF in any PIL mode become RGB. Transparent images (RGBA, LA, palette or
grey with a transparent colour) are alpha-composited onto black (CT background is air, i.e.
black), not just stripped of their alpha; 16-bit grey is scaled by 1/257. Sizes are kept.

Corrupt files: every image file is opened once by `load_dataset` (PIL ``verify()``, which
reads headers and chunk checksums but does not decode all pixels), every NIfTI volume of the
split is read once. ``on_error="raise"`` (default) raises `DatasetError` naming the file,
``on_error="skip"`` drops it and one warning counts the dropped files and names a few.
"""
from __future__ import annotations

import csv
import io
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

try:  # nibabel is only needed for the "nifti" kind
    import nibabel as nib
except ImportError:  # pragma: no cover - exercised only where nibabel is missing
    nib = None

__all__ = [
    "DATASET_KINDS",
    "SPLITS",
    "DatasetError",
    "Slice",
    "SliceDataset",
    "check_no_patient_leak",
    "detect_kind",
    "load_dataset",
    "to_rgb",
    "window_hu",
]

DATASET_KINDS = ("covid-ct", "sars-cov-2", "nifti", "folder")
SPLITS = ("train", "val", "test", "all")
ON_ERROR = ("raise", "skip")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LUNG_WINDOW = (-1250.0, 250.0)

_KIND_HELP = {
    "covid-ct": "Images-processed/CT_COVID/ + Images-processed/CT_NonCOVID/ and "
    "Data-split/{COVID,NonCOVID}/{train,val,test}CT_{COVID,NonCOVID}.txt",
    "sars-cov-2": "COVID/*.png + non-COVID/*.png",
    "nifti": "*.nii[.gz] volumes (in the root or a folder such as COVID-19-CT-Seg_20cases/) "
    "with Infection_Mask/ and Lung_Mask/",
    "folder": "COVID/ + NonCOVID/ (or CT_COVID/ + CT_NonCOVID/, covid/ + non-covid/ ...), "
    "optionally inside train/, val/, test/",
}
_CLASS_NAME = {1: "COVID", 0: "non-COVID"}
_CLASS_NS = {1: "covid", 0: "noncovid"}


class DatasetError(ValueError):
    """A dataset that cannot be loaded as asked: missing or corrupt files, bad layout, leaks."""


@dataclass(frozen=True)
class Slice:
    """One sample: an image file, or axial slice `index` of the NIfTI volume `source`.

    intensity (NIfTI only): "hu" (apply the lung window) or "uint8" (already windowed to
    [0, 255]); None lets `SliceDataset` decide from the volume's range on first use.
    """

    source: str
    label: int
    patient: str
    index: int | None = None
    intensity: str | None = None


# --------------------------------------------------------------------------------------------
# Pixel conversions
# --------------------------------------------------------------------------------------------
def window_hu(hu: np.ndarray, low: float = LUNG_WINDOW[0], high: float = LUNG_WINDOW[1]) -> np.ndarray:
    """Hounsfield units → uint8: `low` → 0, `high` → 255, linear between, clipped outside,
    rounded half up. NaN counts as `low`."""
    if not high > low:
        raise ValueError(f"window_hu needs high > low, got low={low}, high={high}")
    x = np.asarray(hu, dtype=np.float64)
    x = np.nan_to_num(x, nan=low, posinf=high, neginf=low)
    x = (np.clip(x, low, high) - low) * 255.0 / (high - low)  # multiply first: exact halves
    return np.floor(x + 0.5).astype(np.uint8)


def _intensity_to_uint8(values: np.ndarray) -> np.ndarray:
    x = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    return np.floor(np.clip(x, 0.0, 255.0) + 0.5).astype(np.uint8)


def intensity_of(vmin: float, vmax: float) -> str:
    """Radiopaedia volumes of the Ma et al. set are stored windowed to [0, 255], not in HU."""
    return "uint8" if vmin >= 0.0 and vmax <= 255.0 else "hu"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image → RGB. Transparency is composited onto black; 16-bit grey scaled by 1/257."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if a.size and np.nanmax(a) > 255:
            a = a / 257.0
        grey = _intensity_to_uint8(a)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    return img.convert("RGB")


def volume_slice_to_rgb(values: np.ndarray, intensity: str) -> Image.Image:
    if intensity not in ("hu", "uint8"):
        raise DatasetError(f"unknown slice intensity {intensity!r}; expected 'hu' or 'uint8'")
    grey = window_hu(values) if intensity == "hu" else _intensity_to_uint8(values)
    grey = np.rot90(grey)  # axis 1 bottom → top, axis 0 left → right
    return Image.fromarray(np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2)), "RGB")


# --------------------------------------------------------------------------------------------
# The torch Dataset
# --------------------------------------------------------------------------------------------
class SliceDataset(Dataset):
    """`Slice` records → (transform(RGB PIL image) or the image, label).

    NIfTI slices are read one at a time through nibabel's array proxy; the loaded headers of
    the `cache_size` most recently used volumes are kept (LRU). The cache is not pickled, so
    every DataLoader worker builds its own.
    """

    def __init__(self, slices: Sequence[Slice], transform: Callable | None = None, cache_size: int = 4):
        self.slices = list(slices)
        for i, s in enumerate(self.slices):
            if not isinstance(s, Slice):
                raise TypeError(f"slices[{i}] is a {type(s).__name__}, not a Slice")
        self.transform = transform
        self.targets = [int(s.label) for s in self.slices]
        self.patients = [s.patient for s in self.slices]
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self.cache_size = int(cache_size)
        self._volumes: OrderedDict[str, object] = OrderedDict()
        self._intensity: dict[str, str] = {}
        self._hits = self._misses = 0

    @classmethod
    def from_root(cls, root, split: str, kind: str = "auto", transform: Callable | None = None, **kw):
        """`SliceDataset(load_dataset(root, split, kind, **kw), transform)`."""
        return cls(load_dataset(root, split, kind, **kw), transform=transform)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int):
        s = self.slices[i]
        img = self.load_image(s)
        return (self.transform(img) if self.transform is not None else img), int(s.label)

    def load_image(self, s: Slice) -> Image.Image:
        """The RGB PIL image of one record."""
        if s.index is None:
            try:
                with Image.open(s.source) as im:
                    im.load()
                    rgb = to_rgb(im)
                    return rgb.copy() if rgb is im else rgb  # detached from the closed file
            except Exception as exc:
                raise DatasetError(f"cannot decode image {s.source}: {exc}") from exc
        try:
            img = self._volume(s.source)
            values = np.asarray(img.dataobj[_axial(img.ndim, s.index)], dtype=np.float32)
            intensity = s.intensity or self._volume_intensity(s.source, img)
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(f"cannot read slice {s.index} of {s.source}: {exc}") from exc
        return volume_slice_to_rgb(values, intensity)

    def cache_info(self) -> dict:
        """hits / misses of the volume cache and the volumes it holds now."""
        return {"hits": self._hits, "misses": self._misses, "volumes": list(self._volumes)}

    def _volume(self, path: str):
        if path in self._volumes:
            self._hits += 1
            self._volumes.move_to_end(path)
            return self._volumes[path]
        self._misses += 1
        img = _nib().load(path)
        self._volumes[path] = img
        while len(self._volumes) > self.cache_size:
            self._volumes.popitem(last=False)
        return img

    def _volume_intensity(self, path: str, img) -> str:
        # Only for records built by hand without `intensity`: reads the volume once.
        if path not in self._intensity:
            self._intensity[path] = intensity_of(*_value_range(img, Path(path)))
        return self._intensity[path]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_volumes"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        n1 = sum(self.targets)
        return (f"SliceDataset({len(self)} slices: {n1} COVID, {len(self) - n1} non-COVID; "
                f"{len(set(self.patients))} patients)")


def _axial(ndim: int, k: int) -> tuple:
    """Index of axial slice k: the third axis, trailing singleton axes (4-D NIfTI) dropped."""
    return (slice(None), slice(None), int(k)) + (0,) * (ndim - 3)


def _nib():
    if nib is None:
        raise DatasetError("the 'nifti' kind needs nibabel: pip install nibabel")
    return nib


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
def load_dataset(
    root,
    split: str,
    kind: str = "auto",
    *,
    on_error: str = "raise",
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    check_leaks: bool = True,
) -> list[Slice]:
    """The `Slice` records of one split ("train", "val", "test" or "all") of a dataset.

    kind: one of DATASET_KINDS or "auto" (`detect_kind`). on_error: "raise" or "skip" for
    unreadable files. seed, val_fraction, test_fraction: random splits (sars-cov-2, nifti,
    folder without split subfolders). check_leaks: check that the dataset's given splits
    (covid-ct, folder with split subfolders) share no patient.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if kind != "auto" and kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of auto, {', '.join(DATASET_KINDS)}")
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r}; choose one of {', '.join(ON_ERROR)}")
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    if kind == "auto":
        kind = detect_kind(root)
    opts = _Options(split, on_error, int(seed), float(val_fraction), float(test_fraction), check_leaks)
    slices = _LOADERS[kind](root, opts)
    _require_both_classes(slices, split, f"{kind} dataset at {root}")
    return slices


def detect_kind(root) -> str:
    """Which of DATASET_KINDS the folder `root` holds; an error says what each kind expects."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    if _child(root, "Images-processed") is not None or _child(root, "Data-split") is not None:
        return "covid-ct"
    if _find_nifti_layout(root, strict=False) is not None:
        return "nifti"
    classes = _class_dirs(root)
    if classes is not None:
        if classes[1].name.lower() == "covid" and classes[0].name.lower() == "non-covid":
            return "sars-cov-2"
        return "folder"
    if _split_dirs(root):
        return "folder"
    expected = "\n".join(f"  {k}: {v}" for k, v in _KIND_HELP.items())
    raise DatasetError(f"cannot tell which dataset {root} holds; looked for\n{expected}")


def check_no_patient_leak(splits: Mapping[str, Sequence[Slice]]) -> None:
    """Raise `DatasetError` (a ValueError) naming every patient found in more than one split."""
    where: dict[str, list[str]] = {}
    for name, slices in splits.items():
        for p in sorted({s.patient for s in slices}):
            where.setdefault(p, []).append(name)
    leaks = {p: names for p, names in where.items() if len(names) > 1}
    if leaks:
        shown = "; ".join(f"patient {p!r} in {', '.join(n)}" for p, n in sorted(leaks.items())[:10])
        more = f" (and {len(leaks) - 10} more)" if len(leaks) > 10 else ""
        raise DatasetError(f"{len(leaks)} patient(s) appear in more than one split: {shown}{more}")


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Options:
    split: str
    on_error: str
    seed: int
    val_fraction: float
    test_fraction: float
    check_leaks: bool


def _norm(name: str) -> str:
    """Lower case without spaces, underscores and hyphens: for folder and column names."""
    return re.sub(r"[\s_\-]+", "", name.lower())


def _child(folder: Path, name: str) -> Path | None:
    """The subfolder of `folder` called `name`, ignoring case, spaces, '_' and '-'."""
    want = _norm(name)
    hits = sorted(p for p in folder.iterdir() if p.is_dir() and _norm(p.name) == want)
    return hits[0] if hits else None


def _class_of(dirname: str) -> int | None:
    n = _norm(dirname)
    n = n[2:] if n.startswith("ct") else n
    return {"covid": 1, "covid19": 1, "noncovid": 0, "noncovid19": 0}.get(n)


def _class_dirs(folder: Path) -> dict[int, Path] | None:
    """{1: COVID folder, 0: non-COVID folder} when both are there, else None."""
    found: dict[int, list[Path]] = {0: [], 1: []}
    for p in sorted(folder.iterdir()):
        c = _class_of(p.name) if p.is_dir() else None
        if c is not None:
            found[c].append(p)
    for c, dirs in found.items():
        if len(dirs) > 1:
            raise DatasetError(
                f"{folder} has several {_CLASS_NAME[c]} folders: {', '.join(d.name for d in dirs)}"
            )
    if found[0] and found[1]:
        return {1: found[1][0], 0: found[0][0]}
    return None


def _split_dirs(folder: Path) -> dict[str, Path]:
    """{"train"|"val"|"test": folder} for split subfolders that hold both class folders."""
    aliases = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "test": "test", "testing": "test"}
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        s = aliases.get(_norm(p.name)) if p.is_dir() else None
        if s is not None and s not in out and _class_dirs(p) is not None:
            out[s] = p
    return out


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _first_unreadable(path: Path) -> str | None:
    """Why PIL cannot read `path` (a cheap check: headers and checksums), or None."""
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types: OSError, SyntaxError, ValueError ...
        return f"{type(exc).__name__}: {exc}"
    return None


def _drop_unreadable(items: list, path_of: Callable, on_error: str, why: Callable[[Path], str | None]):
    """Keep the items whose file reads; raise on the first bad one, or skip them with a warning."""
    kept, bad = [], []
    cache: dict[str, str | None] = {}
    for it in items:
        p = Path(path_of(it))
        key = str(p)
        if key not in cache:
            cache[key] = why(p)
        if cache[key] is None:
            kept.append(it)
        elif on_error == "raise":
            raise DatasetError(f"cannot read {p}: {cache[key]} (on_error='skip' skips such files)")
        else:
            bad.append(key)
    bad = list(dict.fromkeys(bad))
    if bad:
        names = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        warnings.warn(f"skipped {len(bad)} unreadable file(s): {names}", UserWarning, stacklevel=4)
    return kept


def _require_both_classes(slices: Sequence[Slice], split: str, where: str) -> None:
    counts = {c: sum(1 for s in slices if s.label == c) for c in (0, 1)}
    empty = [_CLASS_NAME[c] for c in (1, 0) if counts[c] == 0]
    if empty:
        raise DatasetError(
            f"split {split!r} of the {where} has no {' and no '.join(empty)} sample "
            f"({counts[1]} COVID, {counts[0]} non-COVID)"
        )


def _split_sizes(n: int, val_fraction: float, test_fraction: float, at_least_one: bool) -> tuple[int, int]:
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if at_least_one and n >= 3:
        n_val = max(n_val, 1) if val_fraction > 0 else 0
        n_test = max(n_test, 1) if test_fraction > 0 else 0
    while n_val + n_test > max(n - 1, 0) and (n_val or n_test):
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def _random_split(groups: Iterable[str], opts: _Options, salt: int) -> dict[str, str]:
    """group → "train" | "val" | "test": a seeded permutation of the sorted groups."""
    groups = sorted(set(groups))
    n_val, n_test = _split_sizes(len(groups), opts.val_fraction, opts.test_fraction, True)
    order = np.random.default_rng([opts.seed, salt]).permutation(len(groups))
    out = {}
    for rank, i in enumerate(order):
        out[groups[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def _leak_warning(kind: str, root: Path) -> None:
    warnings.warn(
        f"{kind} dataset at {root}: no patient ids, so every image is its own patient and the "
        "random train/val/test split is per image. Slices of one patient can be in both train "
        "and test (patient leak), so results on this split are optimistic.",
        UserWarning,
        stacklevel=5,
    )


# --------------------------------------------------------------------------------------------
# covid-ct
# --------------------------------------------------------------------------------------------
_COVID_CT = {1: ("COVID", "CT_COVID"), 0: ("NonCOVID", "CT_NonCOVID")}
_FILE_COLUMNS = {"filename", "imagename", "file", "image", "imagefile"}
_PATIENT_COLUMNS = {"patientid", "patient", "patientno", "patientnumber"}


def _read_list(path: Path) -> list[str]:
    """Non-blank lines, stripped (CRLF, trailing spaces and a BOM tolerated), duplicates dropped."""
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    return list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def _table_rows(path: Path) -> list[list[str]]:
    if path.suffix.lower() == ".csv":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        return [[_cell(c) for c in row] for row in csv.reader(io.StringIO(text))]
    try:
        import openpyxl
    except ImportError as exc:
        raise DatasetError(
            f"reading {path} needs openpyxl (pip install openpyxl), or save it as "
            f"{path.with_suffix('.csv').name} next to it"
        ) from exc
    wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        return [[_cell(c) for c in row] for row in wb.worksheets[0].iter_rows(values_only=True)]
    finally:
        wb.close()


def _read_metadata(path: Path) -> dict[str, str]:
    """file name → patient id from one metadata sheet (header found among the first rows)."""
    rows = _table_rows(path)
    for h, header in enumerate(rows[:10]):
        cols = [_norm(c) for c in header]
        fcol = next((i for i, c in enumerate(cols) if c in _FILE_COLUMNS), None)
        pcol = next((i for i, c in enumerate(cols) if c in _PATIENT_COLUMNS), None)
        if fcol is not None and pcol is not None:
            break
    else:
        raise DatasetError(
            f"{path}: no header with a file-name column ('File name' / 'image name') and a "
            "patient column ('Patient ID' / 'patient id') in its first rows"
        )
    out = {}
    for row in rows[h + 1:]:
        if len(row) > max(fcol, pcol) and row[fcol] and row[pcol]:
            out[row[fcol]] = row[pcol]
    return out


def _find_metadata(root: Path, stem: str) -> list[Path]:
    """Metadata files named `stem` (.csv first, then .xlsx), in the root and the usual subfolders."""
    places = [root] + [d for d in (_child(root, "Data-split"), _child(root, "Images-processed")) if d]
    found = []
    for suffix in (".csv", ".xlsx"):
        for place in places:
            found += sorted(p for p in place.iterdir()
                            if p.is_file() and p.name.lower() == f"{stem.lower()}{suffix}")
    return found


def _metadata_lookup(table: dict[str, str]) -> Callable[[str], str | None]:
    exact = table
    lower = {k.lower(): v for k, v in table.items()}
    stems = {Path(k).stem.lower(): v for k, v in table.items()}

    def find(name: str) -> str | None:
        if name in exact:
            return exact[name]
        return lower.get(name.lower(), stems.get(Path(name).stem.lower()))

    return find


def _load_covid_ct(root: Path, opts: _Options) -> list[Slice]:
    images = _child(root, "Images-processed")
    splits_dir = _child(root, "Data-split")
    if images is None or splits_dir is None:
        raise DatasetError(f"covid-ct dataset at {root} needs {_KIND_HELP['covid-ct']}")
    # label → split → (list file, names)
    lists: dict[int, dict[str, tuple[Path, list[str]]]] = {}
    dirs: dict[int, Path] = {}
    for label, (sub, stem) in _COVID_CT.items():
        d = _child(images, stem)
        if d is None:
            raise DatasetError(f"covid-ct dataset at {root}: missing folder {images / stem}")
        dirs[label] = d
        lists[label] = {}
        for s in ("train", "val", "test"):
            f = splits_dir / sub / f"{s}{stem}.txt"
            if not f.is_file():
                raise DatasetError(f"covid-ct dataset at {root}: missing split file {f}")
            lists[label][s] = (f, _read_list(f))

    meta_files = {
        1: _find_metadata(root, "COVID-CT-MetaInfo"),
        0: _find_metadata(root, "NonCOVID-CT-MetaInfo"),
    }
    no_meta: list[str] = []
    records: dict[str, list[tuple[Slice, Path, str]]] = {"train": [], "val": [], "test": []}
    for label in (1, 0):
        table: dict[str, str] = {}
        for f in meta_files[label]:
            table.update(_read_metadata(f))
        patient_of = _metadata_lookup(table)
        for s, (list_file, names) in lists[label].items():
            for name in names:
                pid = patient_of(name)
                if pid is None:
                    no_meta.append(name)
                    pid = Path(name).stem
                rec = Slice(str(dirs[label] / name), label, f"{_CLASS_NS[label]}/{pid}")
                records[s].append((rec, list_file, name))
    if no_meta:
        looked = "; ".join(
            f"{_CLASS_NAME[c]}: " + (", ".join(p.name for p in meta_files[c]) or "no metadata file found")
            for c in (1, 0)
        )
        warnings.warn(
            f"covid-ct dataset at {root}: {len(no_meta)} image(s) in the split files have no "
            f"patient id in the metadata ({looked}); each is its own patient: "
            + ", ".join(no_meta[:5]) + (", ..." if len(no_meta) > 5 else ""),
            UserWarning,
            stacklevel=3,
        )
    if opts.check_leaks:
        try:
            check_no_patient_leak({s: [r for r, _, _ in recs] for s, recs in records.items()})
        except DatasetError as exc:
            raise DatasetError(f"covid-ct split files in {splits_dir} leak patients: {exc} "
                               "(check_leaks=False loads them anyway)") from None

    wanted = ("train", "val", "test") if opts.split == "all" else (opts.split,)
    chosen = [t for s in wanted for t in records[s]]
    by_name = {label: {p.name.lower(): p for p in dirs[label].iterdir() if p.is_file()} for label in (0, 1)}
    out = []
    for rec, list_file, name in chosen:
        path = Path(rec.source)
        if not path.is_file():
            alt = by_name[rec.label].get(name.lower())
            if alt is None:
                raise DatasetError(f"{name} is listed in {list_file} but is not in {dirs[rec.label]}")
            rec = Slice(str(alt), rec.label, rec.patient)
        out.append(rec)
    return _drop_unreadable(out, lambda r: r.source, opts.on_error, _first_unreadable)


# --------------------------------------------------------------------------------------------
# sars-cov-2 and folder
# --------------------------------------------------------------------------------------------
def _class_images(class_dir: Path, label: int, prefix: str) -> tuple[list[Slice], bool]:
    """Images of one class folder; also whether any is a per-image patient (directly inside)."""
    out, per_image = [], False
    for p in sorted(class_dir.rglob("*")):
        rel = p.relative_to(class_dir)
        if not _is_image(p) or any(part.startswith(".") or part == "__MACOSX" for part in rel.parts):
            continue
        if len(rel.parts) == 1:
            per_image = True
            patient = f"{_CLASS_NS[label]}/{prefix}{p.stem}"
        else:
            patient = f"{_CLASS_NS[label]}/{rel.parts[0]}"
        out.append(Slice(str(p), label, patient))
    return out, per_image


def _load_random_split_images(root: Path, classes: dict[int, Path], opts: _Options, kind: str) -> list[Slice]:
    out: list[Slice] = []
    leaky = False
    for label in (1, 0):
        slices, per_image = _class_images(classes[label], label, "")
        if not slices:
            raise DatasetError(f"{kind} dataset at {root}: no images in {classes[label]}")
        leaky |= per_image
        if opts.split == "all":
            out += slices
            continue
        assign = _random_split((s.patient for s in slices), opts, salt=label)
        out += [s for s in slices if assign[s.patient] == opts.split]
    if leaky:
        _leak_warning(kind, root)
    return _drop_unreadable(out, lambda r: r.source, opts.on_error, _first_unreadable)


def _load_sars_cov_2(root: Path, opts: _Options) -> list[Slice]:
    classes = _class_dirs(root)
    if classes is None:
        raise DatasetError(f"sars-cov-2 dataset at {root} needs {_KIND_HELP['sars-cov-2']}")
    return _load_random_split_images(root, classes, opts, "sars-cov-2")


def _load_folder(root: Path, opts: _Options) -> list[Slice]:
    split_dirs = _split_dirs(root)
    if not split_dirs:
        classes = _class_dirs(root)
        if classes is None:
            raise DatasetError(f"folder dataset at {root} needs {_KIND_HELP['folder']}")
        return _load_random_split_images(root, classes, opts, "folder")
    records: dict[str, list[Slice]] = {}
    for s, d in split_dirs.items():
        classes = _class_dirs(d)
        records[s] = []
        for label in (1, 0):
            records[s] += _class_images(classes[label], label, f"{s}/")[0]
    if opts.check_leaks:
        check_no_patient_leak(records)
    wanted = tuple(split_dirs) if opts.split == "all" else (opts.split,)
    missing = [s for s in wanted if s not in split_dirs]
    if missing:
        raise DatasetError(f"folder dataset at {root} has no {missing[0]}/ folder with COVID/ and "
                           f"NonCOVID/ inside (found: {', '.join(split_dirs)})")
    out = [r for s in wanted for r in records[s]]
    return _drop_unreadable(out, lambda r: r.source, opts.on_error, _first_unreadable)


# --------------------------------------------------------------------------------------------
# nifti
# --------------------------------------------------------------------------------------------
def nifti_stem(p: Path) -> str:
    name = p.name
    for suf in (".nii.gz", ".nii"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return p.stem


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and (p.name.lower().endswith(".nii") or p.name.lower().endswith(".nii.gz")))


def _mask_key(stem: str) -> str:
    """A name with the decorations of the Ma et al. release dropped, to pair volumes and masks:
    coronacases_org_001 → coronacases_001, radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm →
    radiopaedia_4_85506_1; also drops mask / infection / lung / seg / label words."""
    s = re.sub(r"covid-?19-?pneumonia", " ", stem.lower())
    tokens = [t for t in re.split(r"[\s_\-.]+", s) if t]
    drop = {"org", "dcm", "mask", "masks", "infection", "lung", "lungs", "seg", "label", "labels", "ct"}
    return "_".join(t for t in tokens if t not in drop)


@dataclass
class _NiftiLayout:
    volume_dir: Path
    volumes: list[Path]
    infection_dir: Path
    lung_dir: Path


def _find_nifti_layout(root: Path, strict: bool = True) -> _NiftiLayout | None:
    """Locate the volume folder and the mask folders (searched to two levels below root)."""
    folders = [root]
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        folders.append(d)
        folders += sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))

    def named(key: str) -> Path | None:
        return next((f for f in folders if _norm(f.name) == key and _nifti_files(f)), None)

    infection, lung = named("infectionmask"), named("lungmask")
    candidates = [f for f in folders if (f == root or "mask" not in _norm(f.name)) and _nifti_files(f)]
    if root in candidates:
        volume_dir = root
    elif len(candidates) == 1:
        volume_dir = candidates[0]
    else:
        preferred = [f for f in candidates if re.search(r"20cases|ctscans|volumes|images", _norm(f.name))]
        volume_dir = preferred[0] if len(preferred) == 1 else None
    if volume_dir is None or infection is None or lung is None:
        if not strict:
            return None
        if volume_dir is None and len(candidates) > 1:
            problem = "several folders hold volumes: " + ", ".join(str(c) for c in candidates)
        elif volume_dir is None:
            problem = "no *.nii / *.nii.gz volumes found outside the mask folders"
        else:
            absent = [n for n, d in (("Infection_Mask/", infection), ("Lung_Mask/", lung)) if d is None]
            problem = "missing " + " and ".join(absent)
        raise DatasetError(f"nifti dataset at {root}: {problem}; expected {_KIND_HELP['nifti']}")
    return _NiftiLayout(volume_dir, _nifti_files(volume_dir), infection, lung)


def _match_mask(volume: Path, mask_dir: Path) -> Path:
    masks = _nifti_files(mask_dir)
    for m in masks:
        if m.name == volume.name:
            return m
    key = _mask_key(nifti_stem(volume))
    hits = [m for m in masks if nifti_stem(m) == nifti_stem(volume) or _mask_key(nifti_stem(m)) == key]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise DatasetError(f"no mask for volume {volume.name} in {mask_dir} (looked for the same "
                           f"name, or a name that reduces to {key!r})")
    raise DatasetError(f"several masks in {mask_dir} match volume {volume.name}: "
                       + ", ".join(m.name for m in hits))


def as_3d(a: np.ndarray, path: Path) -> np.ndarray:
    while a.ndim > 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise DatasetError(f"{path}: expected a 3-D volume, got shape {a.shape}")
    return a


def stored_array(img) -> tuple[np.ndarray, float, float]:
    """The volume as stored (no float copy: int16 stays int16) and its scaling: value =
    stored * slope + inter."""
    proxy = img.dataobj
    if hasattr(proxy, "get_unscaled") and hasattr(proxy, "slope") and hasattr(proxy, "inter"):
        return np.asanyarray(proxy.get_unscaled()), float(proxy.slope), float(proxy.inter)
    return np.asanyarray(proxy), 1.0, 0.0


def _value_range(img, path: Path) -> tuple[float, float]:
    raw, slope, inter = stored_array(img)
    raw = as_3d(raw, path)
    lo, hi = (float(np.nanmin(raw)) * slope + inter, float(np.nanmax(raw)) * slope + inter)
    return min(lo, hi), max(lo, hi)


def _nonempty_slices(path: Path, shape: tuple) -> np.ndarray:
    raw, slope, inter = stored_array(_nib().load(str(path)))
    m = as_3d(raw, path)
    if m.shape != shape:
        raise DatasetError(f"mask {path} has shape {m.shape}, its volume has {shape}")
    nonzero = (m != 0) if inter == 0.0 and slope != 0.0 else (m * slope + inter != 0)
    return nonzero.any(axis=(0, 1))


def _volume_slices(volume: Path, layout: _NiftiLayout) -> list[Slice]:
    infection = _match_mask(volume, layout.infection_dir)
    lung = _match_mask(volume, layout.lung_dir)
    img = _nib().load(str(volume))
    intensity = intensity_of(*_value_range(img, volume))  # one full read of the volume
    shape = tuple(int(n) for n in img.shape[:3])
    inf, lun = _nonempty_slices(infection, shape), _nonempty_slices(lung, shape)
    patient = nifti_stem(volume)
    out = []
    for k in range(shape[2]):
        if inf[k] or lun[k]:
            out.append(Slice(str(volume), 1 if inf[k] else 0, patient, k, intensity))
    return out


def _load_nifti(root: Path, opts: _Options) -> list[Slice]:
    layout = _find_nifti_layout(root)
    volumes = layout.volumes
    if opts.split == "all":
        chosen = volumes
    else:
        if len(volumes) < 3:
            raise DatasetError(
                f"nifti dataset at {root}: {len(volumes)} volume(s) in {layout.volume_dir}; a "
                "patient-level train/val/test split needs at least 3 (one volume = one patient); "
                "use split='all' or add volumes"
            )
        assign = _random_split((nifti_stem(v) for v in volumes), opts, salt=0)
        chosen = [v for v in volumes if assign[nifti_stem(v)] == opts.split]
    out: list[Slice] = []
    bad: list[str] = []
    for v in chosen:
        try:
            out += _volume_slices(v, layout)
        except DatasetError:
            raise
        except Exception as exc:
            if opts.on_error == "raise":
                raise DatasetError(f"cannot read volume {v} or its masks: {type(exc).__name__}: {exc} "
                                   "(on_error='skip' skips such volumes)") from exc
            bad.append(str(v))
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable volume(s): " + ", ".join(bad[:5])
                      + (", ..." if len(bad) > 5 else ""), UserWarning, stacklevel=3)
    return out


_LOADERS = {
    "covid-ct": _load_covid_ct,
    "sars-cov-2": _load_sars_cov_2,
    "nifti": _load_nifti,
    "folder": _load_folder,
}
