"""Public-dataset loaders: layouts, labels, patient ids, splits, pixel conversion, errors.

Every test builds a tiny dataset of the real layout in tmp_path (PIL images, nibabel volumes).
"""
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

nib = pytest.importorskip("nibabel")

from mutex_attn.data import datasets as D  # noqa: E402
from mutex_attn.data.datasets import (  # noqa: E402
    DatasetError,
    Slice,
    SliceDataset,
    check_no_patient_leak,
    detect_kind,
    load_dataset,
    window_hu,
)


# --------------------------------------------------------------------------------------------
# Fixture builders
# --------------------------------------------------------------------------------------------
def save_image(path: Path, mode: str, size=(20, 16), value=(120, 60, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGBA":
        img = Image.new("RGBA", size, value + (255,))
        img.putpixel((0, 0), value + (0,))      # fully transparent → black
        img.putpixel((1, 0), value + (128,))    # half transparent → about half the colour
    elif mode == "P":
        img = Image.new("P", size, 1)
        img.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    elif mode == "I;16":
        img = Image.fromarray(np.full(size[::-1], value, dtype=np.uint16))
    elif mode == "L":
        img = Image.new("L", size, value)
    else:
        img = Image.new("RGB", size, value)
    img.save(path)
    return path


COVID_SPLITS = {"train": ["c1.png", "c2.jpg", "c3.png"], "val": ["c4.png"], "test": ["c5.png", "c6.png"]}
NON_SPLITS = {"train": ["n1.jpg", "n2.png"], "val": ["n3.jpg"], "test": ["n4.jpg", "n5.jpg", "n6.jpg"]}
COVID_META = {"c1.png": "P1", "c2.jpg": "P1", "c3.png": "P2", "c4.png": "P3", "c5.png": "P4"}  # no c6
NON_META = {"n1.jpg": 1, "n2.png": 1, "n3.jpg": 2, "n4.jpg": 3, "n5.jpg": 4, "n6.jpg": 5}


def write_csv(path: Path, header, rows):
    lines = [",".join(header)] + [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def write_xlsx(path: Path, header, rows, blank_rows=0):
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.Workbook()
    ws = wb.active
    for _ in range(blank_rows):
        ws.append([])
    ws.append(list(header))
    for r in rows:
        ws.append(list(r))
    wb.save(path)


def make_covid_ct(root: Path, meta="csv", covid_meta=None):
    img = root / "Images-processed"
    save_image(img / "CT_COVID" / "c1.png", "RGBA", (20, 16), (200, 100, 50))
    save_image(img / "CT_COVID" / "c2.jpg", "RGB", (24, 18), (128, 128, 128))
    save_image(img / "CT_COVID" / "c3.png", "L", (16, 16), 77)
    save_image(img / "CT_COVID" / "c4.png", "P", (12, 10))
    for n in ("c5.png", "c6.png"):
        save_image(img / "CT_COVID" / n, "RGB")
    save_image(img / "CT_NonCOVID" / "n1.jpg", "L", (30, 20), 200)
    save_image(img / "CT_NonCOVID" / "n2.png", "I;16", (10, 10), 257 * 100)
    for n in ("n3.jpg", "n4.jpg", "n5.jpg", "n6.jpg"):
        save_image(img / "CT_NonCOVID" / n, "RGB")
    for sub, stem, lists in (("COVID", "CT_COVID", COVID_SPLITS), ("NonCOVID", "CT_NonCOVID", NON_SPLITS)):
        d = root / "Data-split" / sub
        d.mkdir(parents=True, exist_ok=True)
        for split, names in lists.items():
            # CRLF, trailing spaces, blank lines: all tolerated
            (d / f"{split}{stem}.txt").write_bytes(("\r\n".join(n + "  " for n in names) + "\r\n\r\n").encode())
    covid_rows = sorted((covid_meta or COVID_META).items())
    non_rows = sorted(NON_META.items())
    if meta == "csv":
        write_csv(root / "COVID-CT-MetaInfo.csv", ["File name", "Patient ID", "DOI"], [r + ("x",) for r in covid_rows])
        write_csv(root / "NonCOVID-CT-MetaInfo.csv", ["image name", "patient id"], non_rows)
    else:
        write_xlsx(root / "COVID-CT-MetaInfo.xlsx", ["File name", "Patient ID", "Caption"],
                   [r + ("a caption",) for r in covid_rows])
        # odd spelling of the columns, header below a blank row, ids as numbers
        write_xlsx(root / "NonCOVID-CT-MetaInfo.xlsx", ["Image_Name", "PATIENT ID"],
                   [(n, float(p)) for n, p in non_rows], blank_rows=1)
    return root


def make_sars(root: Path, n_covid=10, n_non=8, non_name="non-COVID"):
    for i in range(1, n_covid + 1):
        save_image(root / "COVID" / f"Covid ({i}).png", "RGB", (8, 8), (i, 0, 0))
    for i in range(1, n_non + 1):
        save_image(root / non_name / f"Non-Covid ({i}).png", "RGB", (8, 8), (0, i, 0))
    return root


MASK_OF = {
    "coronacases_org_001": "coronacases_001",
    "coronacases_org_002": "coronacases_002",
    "radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm": "radiopaedia_4_85506_1",
}
# volume → (slices with lung, slices with infection); 6 slices each, 32 x 24 in-plane
MASK_SLICES = {
    "coronacases_org_001": ({1, 2, 3, 4}, {3, 4}),
    "coronacases_org_002": ({0, 1, 2}, {2}),
    "radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm": ({2, 3, 4, 5}, {4, 5}),
}
SHAPE = (32, 24, 6)


def make_volume(name: str) -> np.ndarray:
    """HU volume (air -1000, a 250 HU marker at array [0, -1, k]); radiopaedia stored as 0..255."""
    if name.startswith("radiopaedia"):
        data = np.full(SHAPE, 30, np.int16)
        data[0, -1, :] = 200
    else:
        data = np.full(SHAPE, -1000, np.int16)
        data[0, -1, :] = 250
    return data


def save_nifti(path: Path, data: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def make_nifti(root: Path, names=tuple(MASK_OF), real_names=True, volume_dir="COVID-19-CT-Seg_20cases", ext=".nii.gz"):
    vdir = root / volume_dir if volume_dir else root
    for name in names:
        save_nifti(vdir / f"{name}{ext}", make_volume(name))
        lung_z, inf_z = MASK_SLICES[name]
        lung = np.zeros(SHAPE, np.uint8)
        inf = np.zeros(SHAPE, np.uint8)
        for z in lung_z:
            lung[4:12, 4:20, z] = 1
            lung[18:28, 4:20, z] = 2
        for z in inf_z:
            inf[6:8, 6:9, z] = 1
        mask_name = MASK_OF[name] if real_names else name
        save_nifti(root / "Infection_Mask" / f"{mask_name}{ext}", inf)
        save_nifti(root / "Lung_Mask" / f"{mask_name}{ext}", lung)
        # the combined masks of the real release must not be taken for volumes
        save_nifti(root / "Lung_and_Infection_Mask" / f"{mask_name}{ext}", lung + inf)
    return root


def names(slices):
    return [Path(s.source).name for s in slices]


# --------------------------------------------------------------------------------------------
# covid-ct
# --------------------------------------------------------------------------------------------
def test_covid_ct_labels_patients_splits_from_csv(tmp_path):
    root = make_covid_ct(tmp_path)
    assert detect_kind(root) == "covid-ct"
    with pytest.warns(UserWarning, match=r"1 image\(s\) .* no patient id.*c6\.png"):
        train = load_dataset(root, "train")
    assert [(Path(s.source).name, s.label, s.patient, s.index) for s in train] == [
        ("c1.png", 1, "covid/P1", None), ("c2.jpg", 1, "covid/P1", None), ("c3.png", 1, "covid/P2", None),
        ("n1.jpg", 0, "noncovid/1", None), ("n2.png", 0, "noncovid/1", None),
    ]
    assert all(Path(s.source).is_file() for s in train)
    with pytest.warns(UserWarning):
        test = load_dataset(root, "test", kind="covid-ct")
    assert names(test) == ["c5.png", "c6.png", "n4.jpg", "n5.jpg", "n6.jpg"]
    assert [s.patient for s in test][:2] == ["covid/P4", "covid/c6"]  # c6: no metadata → its stem
    with pytest.warns(UserWarning):
        everything = load_dataset(root, "all")
    assert len(everything) == 12 and sum(s.label for s in everything) == 6


def test_covid_ct_patient_ids_from_xlsx(tmp_path):
    pytest.importorskip("openpyxl")
    root = make_covid_ct(tmp_path, meta="xlsx")
    with pytest.warns(UserWarning, match="no patient id"):
        val = load_dataset(root, "val")
    assert [(Path(s.source).name, s.label, s.patient) for s in val] == [
        ("c4.png", 1, "covid/P3"), ("n3.jpg", 0, "noncovid/2"),  # 2.0 in the sheet → "2"
    ]


def test_covid_ct_images_become_rgb(tmp_path):
    root = make_covid_ct(tmp_path)
    with pytest.warns(UserWarning):
        ds = SliceDataset(load_dataset(root, "train"))
    assert ds.targets == [1, 1, 1, 0, 0]
    assert ds.patients == ["covid/P1", "covid/P1", "covid/P2", "noncovid/1", "noncovid/1"]
    imgs = [ds[i][0] for i in range(len(ds))]
    assert [im.mode for im in imgs] == ["RGB"] * 5
    assert [im.size for im in imgs] == [(20, 16), (24, 18), (16, 16), (30, 20), (10, 10)]
    rgba = np.asarray(imgs[0])
    assert rgba[0, 0].tolist() == [0, 0, 0]                 # alpha 0 → black background
    assert np.abs(rgba[0, 1].astype(int) - [100, 50, 25]).max() <= 1  # alpha 128 → ~half
    assert rgba[5, 5].tolist() == [200, 100, 50]            # opaque → the colour
    assert np.unique(np.asarray(imgs[2])).tolist() == [77]  # grey → r = g = b
    assert np.unique(np.asarray(imgs[4])).tolist() == [100]  # 16-bit grey 25700 → 100
    with pytest.warns(UserWarning):
        (pal,) = [s for s in load_dataset(root, "val") if s.label == 1]
    assert np.asarray(SliceDataset([pal])[0][0])[3, 3].tolist() == [10, 20, 30]  # palette colour


def test_covid_ct_leaking_split_files_name_patient_and_splits(tmp_path):
    root = make_covid_ct(tmp_path, covid_meta={**COVID_META, "c5.png": "P1"})  # P1 in train and test
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match=r"patient 'covid/P1' in train, test") as e:
        load_dataset(root, "val")  # checked whatever split is asked for
    assert isinstance(e.value, ValueError)
    with pytest.warns(UserWarning):  # the check can be turned off
        assert names(load_dataset(root, "test", check_leaks=False))[0] == "c5.png"


def test_covid_ct_missing_file_names_file_and_split_file(tmp_path):
    root = make_covid_ct(tmp_path)
    (root / "Images-processed" / "CT_COVID" / "c3.png").unlink()
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match=r"c3\.png is listed in .*trainCT_COVID\.txt"):
        load_dataset(root, "train")


def test_corrupt_images_raise_or_are_skipped(tmp_path):
    root = make_covid_ct(tmp_path)
    covid = root / "Images-processed" / "CT_COVID"
    (covid / "c2.jpg").write_text("this is not an image")
    data = (covid / "c3.png").read_bytes()
    (covid / "c3.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match=r"c2\.jpg"):
        load_dataset(root, "train")
    with pytest.warns(UserWarning) as record:
        kept = load_dataset(root, "train", on_error="skip")
    assert names(kept) == ["c1.png", "n1.jpg", "n2.png"]
    skipped = [str(w.message) for w in record if "skipped" in str(w.message)]
    assert len(skipped) == 1 and "skipped 2 unreadable" in skipped[0]
    assert "c2.jpg" in skipped[0] and "c3.png" in skipped[0]


def test_image_that_breaks_after_loading_names_the_file(tmp_path):
    root = make_covid_ct(tmp_path)
    with pytest.warns(UserWarning):
        ds = SliceDataset(load_dataset(root, "train"))
    (root / "Images-processed" / "CT_COVID" / "c1.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match=r"c1\.png"):
        ds[0]
    assert ds[1][1] == 1  # the others still load


def test_empty_class_in_a_split_is_an_error(tmp_path):
    root = make_covid_ct(tmp_path)
    (root / "Data-split" / "NonCOVID" / "valCT_NonCOVID.txt").write_text("\n \n")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match=r"split 'val'.* no non-COVID sample \(1 COVID, 0 non-COVID\)"):
        load_dataset(root, "val")


# --------------------------------------------------------------------------------------------
# sars-cov-2 and folder
# --------------------------------------------------------------------------------------------
def test_sars_cov_2_random_stratified_deterministic_splits(tmp_path):
    root = make_sars(tmp_path)
    assert detect_kind(root) == "sars-cov-2"
    with pytest.warns(UserWarning, match="patient leak"):
        splits = {s: load_dataset(root, s, seed=3) for s in ("train", "val", "test")}
    # 10 COVID → 2 val, 2 test; 8 non-COVID → 1 val, 2 test (round(n * fraction))
    assert {s: (sum(x.label for x in v), sum(1 - x.label for x in v)) for s, v in splits.items()} == {
        "train": (6, 5), "val": (2, 1), "test": (2, 2)}
    everything = [n for v in splits.values() for n in names(v)]
    assert len(everything) == len(set(everything)) == 18
    check_no_patient_leak(splits)  # every image its own patient: nothing shared
    assert splits["test"][0].patient == "covid/" + Path(splits["test"][0].source).stem
    with pytest.warns(UserWarning):
        assert names(load_dataset(root, "test", seed=3)) == names(splits["test"])  # reproducible
        tests = {tuple(names(load_dataset(root, "test", seed=s))) for s in range(6)}
    assert len(tests) > 1  # and the seed matters


@pytest.mark.parametrize("non_name", ["Non-COVID", "non-covid"])
def test_sars_cov_2_folder_case_variants(tmp_path, non_name):
    root = make_sars(tmp_path, 4, 3, non_name=non_name)
    assert detect_kind(root) == "sars-cov-2"
    with pytest.warns(UserWarning, match="optimistic"):
        assert len(load_dataset(root, "all")) == 7


def test_folder_with_split_subfolders(tmp_path):
    for split in ("train", "val", "test"):
        for cls, shade in (("CT_COVID", 50), ("CT_NonCOVID", 150)):
            for i in range(2):
                save_image(tmp_path / split / cls / f"{split}{i}.png", "L", (8, 8), shade)
    assert detect_kind(tmp_path) == "folder"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # given splits: no leak warning
        val = load_dataset(tmp_path, "val")
    assert [(Path(s.source).name, s.label, s.patient) for s in val] == [
        ("val0.png", 1, "covid/val/val0"), ("val1.png", 1, "covid/val/val1"),
        ("val0.png", 0, "noncovid/val/val0"), ("val1.png", 0, "noncovid/val/val1")]
    assert all("/val/" in s.source.replace("\\", "/") for s in val)
    for f in (tmp_path / "val" / "CT_NonCOVID").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="no non-COVID"):
        load_dataset(tmp_path, "val", kind="folder")


def test_folder_flat_random_split_warns(tmp_path):
    for i in range(6):
        save_image(tmp_path / "covid" / f"a{i}.png", "RGB", (8, 8))
        save_image(tmp_path / "Non_Covid" / f"b{i}.jpg", "RGB", (8, 8))
    assert detect_kind(tmp_path) == "folder"
    with pytest.warns(UserWarning, match="patient leak"):
        parts = [load_dataset(tmp_path, s, seed=1) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [6, 2, 4]  # per class of 6: 1 val (round 0.9), 2 test (round 1.5)
    assert sorted(n for p in parts for n in names(p)) == sorted([f"a{i}.png" for i in range(6)] + [f"b{i}.jpg" for i in range(6)])


def test_folder_patient_subfolders_split_by_patient_without_warning(tmp_path):
    for p in range(5):
        for i in range(3):
            save_image(tmp_path / "COVID" / f"pc{p}" / f"{i}.png", "RGB", (8, 8))
            save_image(tmp_path / "NonCOVID" / f"pn{p}" / f"{i}.png", "RGB", (8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parts = {s: load_dataset(tmp_path, s, seed=2) for s in ("train", "val", "test")}
    check_no_patient_leak(parts)
    for part in parts.values():  # every patient's 3 images stay together
        for pid in set(s.patient for s in part):
            assert sum(s.patient == pid for s in part) == 3
    assert {s.patient for s in parts["train"]} <= {f"covid/pc{p}" for p in range(5)} | {f"noncovid/pn{p}" for p in range(5)}
    assert sum(len(v) for v in parts.values()) == 30


def test_folder_split_subfolders_sharing_a_patient_is_an_error(tmp_path):
    for split in ("train", "test"):
        save_image(tmp_path / split / "COVID" / "p7" / f"{split}.png", "RGB", (8, 8))
        save_image(tmp_path / split / "NonCOVID" / f"{split}.png", "RGB", (8, 8))
    with pytest.raises(DatasetError, match=r"patient 'covid/p7' in test, train"):
        load_dataset(tmp_path, "train")


# --------------------------------------------------------------------------------------------
# nifti
# --------------------------------------------------------------------------------------------
def test_window_hu_values():
    hu = np.array([-3000, -1250, -1100, -1000, -500, 0, 100, 250, 1000, np.nan])
    assert window_hu(hu).tolist() == [0, 0, 26, 43, 128, 213, 230, 255, 255, 0]
    assert window_hu(hu).dtype == np.uint8
    assert window_hu(np.array([-1000.0, 400.0]), low=-1000, high=400).tolist() == [0, 255]
    with pytest.raises(ValueError):
        window_hu(hu, low=10, high=10)


def test_nifti_slice_selection_with_real_mask_names(tmp_path):
    root = make_nifti(tmp_path)
    assert detect_kind(root) == "nifti"
    everything = load_dataset(root, "all")
    got = {}
    for s in everything:
        got.setdefault(s.patient, []).append((s.index, s.label))
    assert got == {
        "coronacases_org_001": [(1, 0), (2, 0), (3, 1), (4, 1)],
        "coronacases_org_002": [(0, 0), (1, 0), (2, 1)],
        "radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm": [(2, 0), (3, 0), (4, 1), (5, 1)],
    }
    assert {s.intensity for s in everything if s.patient.startswith("corona")} == {"hu"}
    assert {s.intensity for s in everything if s.patient.startswith("radio")} == {"uint8"}
    assert all(Path(s.source).parent.name == "COVID-19-CT-Seg_20cases" for s in everything)


def test_nifti_images_windowing_orientation_and_radiopaedia(tmp_path):
    root = make_nifti(tmp_path)
    slices = load_dataset(root, "all")
    ds = SliceDataset(slices)
    hu_img, _ = ds[0]
    assert hu_img.mode == "RGB" and hu_img.size == (32, 24)  # rot90: width = axis 0, height = axis 1
    a = np.asarray(hu_img)
    assert a[0, 0].tolist() == [255, 255, 255]  # array [0, -1] (250 HU) → top-left after rot90
    assert a[-1, -1].tolist() == [43, 43, 43]   # -1000 HU in the lung window
    assert (a[..., 0] == 255).sum() == 1
    radio = [i for i, s in enumerate(slices) if s.patient.startswith("radio")][0]
    r = np.asarray(ds[radio][0])
    assert r[0, 0, 0] == 200 and r[-1, -1, 0] == 30  # already 0..255: not windowed again
    # a record made by hand without `intensity`: decided from the volume's range, same result
    bare = Slice(slices[radio].source, 1, "x", slices[radio].index)
    assert np.array_equal(np.asarray(SliceDataset([bare])[0][0]), r)


def test_nifti_reads_lazily_one_slice_at_a_time(tmp_path, monkeypatch):
    root = make_nifti(tmp_path)
    slices = load_dataset(root, "all")
    loads = []
    real_load = nib.load
    monkeypatch.setattr(nib, "load", lambda p, *a, **k: loads.append(Path(p).name) or real_load(p, *a, **k))

    def no_full_read(*a, **k):
        raise AssertionError("the whole volume was read")

    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", no_full_read)
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", no_full_read)
    ds = SliceDataset(slices, cache_size=2)
    for i in range(len(ds)):
        ds[i]
    assert len(loads) == 3  # one header load per volume, 11 slices
    assert ds.cache_info()["hits"] == len(ds) - 3 and ds.cache_info()["misses"] == 3
    assert len(ds.cache_info()["volumes"]) == 2  # LRU bounded
    copy = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker gets: no open volumes
    assert copy.cache_info()["volumes"] == [] and copy.targets == ds.targets
    v1 = [i for i, s in enumerate(slices) if s.patient.endswith("001")][0]
    v2 = [i for i, s in enumerate(slices) if s.patient.endswith("002")][0]
    small = SliceDataset(slices, cache_size=1)
    for i in (v1, v2, v1, v2):
        small[i]
    assert small.cache_info()["misses"] == 4


def test_nifti_patient_level_deterministic_splits(tmp_path):
    root = make_nifti(tmp_path)
    parts = {s: load_dataset(root, s, seed=0) for s in ("train", "val", "test")}
    patients = {s: {x.patient for x in v} for s, v in parts.items()}
    assert all(len(p) == 1 for p in patients.values())  # 3 volumes: one each
    assert set().union(*patients.values()) == set(MASK_OF)
    check_no_patient_leak(parts)
    assert load_dataset(root, "test", seed=0) == parts["test"]
    tests = {next(iter({x.patient for x in load_dataset(root, "test", seed=s)})) for s in range(8)}
    assert len(tests) > 1


def test_nifti_identical_mask_names_volumes_in_root_and_too_few_volumes(tmp_path):
    root = make_nifti(tmp_path, names=("coronacases_org_001", "coronacases_org_002"),
                      real_names=False, volume_dir=None, ext=".nii")
    assert detect_kind(root) == "nifti"
    assert [(s.patient, s.index, s.label) for s in load_dataset(root, "all")][:2] == [
        ("coronacases_org_001", 1, 0), ("coronacases_org_001", 2, 0)]
    with pytest.raises(DatasetError, match=r"2 volume\(s\).*at least 3"):
        load_dataset(root, "train")


def test_nifti_scaled_storage_is_judged_on_scaled_values(tmp_path):
    # stored uint8 0..150 (would look "already windowed"), but slope 10, inter -1250 → HU
    root = make_nifti(tmp_path, names=("coronacases_org_001",), real_names=False)
    raw = np.full(SHAPE, 100, np.uint8)  # → -250 HU
    raw[0, -1, :] = 150                   # → 250 HU
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(10, -1250)
    nib.save(img, str(root / "COVID-19-CT-Seg_20cases" / "coronacases_org_001.nii.gz"))
    slices = load_dataset(root, "all")
    assert {s.intensity for s in slices} == {"hu"}
    a = np.asarray(SliceDataset(slices)[0][0])[..., 0]
    assert a[0, 0] == 255 and a[-1, -1] == 170  # -250 HU → 1000 * 255 / 1500


def test_nifti_corrupt_volume(tmp_path):
    root = make_nifti(tmp_path)
    bad = root / "COVID-19-CT-Seg_20cases" / "coronacases_org_002.nii.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated gzip
    with pytest.raises(DatasetError, match="coronacases_org_002"):
        load_dataset(root, "all")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable volume.*coronacases_org_002"):
        kept = load_dataset(root, "all", on_error="skip")
    assert {s.patient for s in kept} == set(MASK_OF) - {"coronacases_org_002"}


# --------------------------------------------------------------------------------------------
# The common parts
# --------------------------------------------------------------------------------------------
def test_slice_dataset_with_torchvision_transform(tmp_path):
    from torchvision import transforms

    root = make_covid_ct(tmp_path)
    tf = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])
    with pytest.warns(UserWarning):
        ds = SliceDataset.from_root(root, "train", transform=tf)
    x, y = ds[2]  # c3.png: grey 77
    assert isinstance(x, torch.Tensor) and x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert y == 1 and torch.allclose(x, torch.full((3, 8, 8), 77 / 255))
    nds = SliceDataset(load_dataset(make_nifti(tmp_path / "nii"), "all"), transform=tf)
    x, y = nds[0]
    assert x.shape == (3, 8, 8) and y == 0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch[0].shape == (5, 3, 8, 8) and batch[1].tolist() == [1, 1, 1, 0, 0]


def test_check_no_patient_leak():
    a, b, c = (Slice(f"{n}.png", 1, p) for n, p in (("a", "covid/1"), ("b", "covid/2"), ("c", "covid/1")))
    check_no_patient_leak({"train": [a], "test": [b]})
    with pytest.raises(ValueError, match=r"patient 'covid/1' in train, test"):
        check_no_patient_leak({"train": [a, b], "val": [], "test": [c]})


def test_detect_kind_and_bad_arguments(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as e:
        detect_kind(tmp_path / "empty")
    for kind in D.DATASET_KINDS:
        assert kind in str(e.value)
    assert "Images-processed/CT_COVID" in str(e.value) and "Infection_Mask" in str(e.value)
    root = make_sars(tmp_path / "sars", 3, 3)
    with pytest.raises(ValueError, match="train, val, test, all"):
        load_dataset(root, "training")
    with pytest.raises(ValueError, match="covid-ct, sars-cov-2, nifti, folder"):
        load_dataset(root, "train", kind="mosmed")
    with pytest.raises(ValueError, match="raise, skip"):
        load_dataset(root, "train", on_error="ignore")
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset(root, "train", val_fraction=1.5)
    with pytest.raises(DatasetError, match="covid-ct dataset .* needs"):
        load_dataset(root, "train", kind="covid-ct")
