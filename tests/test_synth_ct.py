"""The synthetic chest-CT dataset: layout, determinism, splits, HU sanity, separability."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from mutex_attn.data import synth_ct
from mutex_attn.data.synth_ct import generate_dataset, simulate_patient, window_to_uint8

SMALL = dict(patients=12, slices_per_patient=3, size=64, progress=False)
CLASSES = {1: ("CT_COVID", "COVID"), 0: ("CT_NonCOVID", "NonCOVID")}


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _split_lists(root: Path) -> dict:
    out = {}
    for c, (_, short) in CLASSES.items():
        for s in ("train", "val", "test"):
            text = (root / "Data-split" / short / f"{s}CT_{short}.txt").read_text()
            out[c, s] = text.split()
    return out


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "a"
    summary = generate_dataset(root, seed=0, **SMALL)
    return root, summary


def test_same_seed_same_bytes_whatever_the_workers(small_set, tmp_path):
    root, _ = small_set
    generate_dataset(tmp_path / "b", seed=0, workers=2, **SMALL)
    generate_dataset(tmp_path / "c", seed=1, **SMALL)
    a, b, c = _files(root), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    pngs = [k for k in a if k.endswith(".png")]
    assert len(pngs) == 12 * 3
    differ = sum(a[k] != c.get(k) for k in pngs)
    assert differ == len(pngs)  # another seed: other patients (and possibly other classes)


def test_layout(small_set):
    root, summary = small_set
    lists = _split_lists(root)
    named = {c: set() for c in CLASSES}
    for (c, _), names in lists.items():
        folder = root / "Images-processed" / CLASSES[c][0]
        for name in names:
            assert name.startswith("synth_p") and name.endswith(".png")
            with Image.open(folder / name) as im:  # exists, 8-bit greyscale, right size
                assert im.mode == "L" and im.size == (64, 64)
            named[c].add(name)
    # Nothing on disk that no list names.
    for c, (folder, _) in CLASSES.items():
        assert {p.name for p in (root / "Images-processed" / folder).iterdir()} == named[c]

    for c, fname, cols in ((1, "COVID-CT-MetaInfo.csv", ["File name", "Patient ID"]),
                           (0, "NonCOVID-CT-MetaInfo.csv", ["image name", "patient id"])):
        with open(root / fname, newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == cols
        assert {r[0] for r in rows[1:]} == named[c] and len(rows) - 1 == len(named[c])
        for name, pid in rows[1:]:
            assert name.startswith(pid + "_s")

    info = json.loads((root / "synth_info.json").read_text())
    assert info["arguments"] == dict(patients=12, slices_per_patient=3, size=64, seed=0,
                                     val_fraction=0.15, test_fraction=0.25, covid_fraction=0.5)
    assert set(info["images"]) == named[0] | named[1]
    for name, rec in info["images"].items():
        assert rec["findings"] and name in named[rec["label"]]
        assert (rec["findings"] == ["normal"]) or "normal" not in rec["findings"]
        if rec["label"] == 1:
            assert "ggo" in rec["findings"]
    assert summary["total_slices"] == 36 and summary["total_patients"] == 12
    assert sum(v for s in summary["slices"].values() for v in s.values()) == 36


def test_patient_level_stratified_split(small_set):
    root, summary = small_set
    lists = _split_lists(root)
    split_of = {}
    for (c, s), names in lists.items():
        assert names, f"split {s} has no class-{c} image"
        for name in names:
            pid = name.rsplit("_s", 1)[0]
            assert split_of.setdefault(pid, s) == s, f"{pid} is in two splits"
    covid_patients = {n.rsplit("_s", 1)[0] for s in ("train", "val", "test") for n in lists[1, s]}
    assert len(covid_patients) == 6 and len(split_of) == 12
    assert summary["patients"]["test"] == {"covid": 2, "noncovid": 2}


def test_class_balance_follows_covid_fraction():
    labels, split = synth_ct._plan(40, 3, 0.25, 0.15, 0.25)
    assert sum(labels) == 10
    for s in ("train", "val", "test"):
        got = {lab for lab, sp in zip(labels, split) if sp == s}
        assert got == {0, 1}
    assert synth_ct._plan(40, 3, 0.25, 0.15, 0.25) == (labels, split)


def test_rerun_cleans_up_and_a_crash_leaves_no_split_lists(small_set, tmp_path, monkeypatch):
    root = tmp_path / "d"
    generate_dataset(root, seed=0, **SMALL)
    generate_dataset(root, seed=0, **{**SMALL, "patients": 6})
    assert len(list((root / "Images-processed").rglob("*.png"))) == 6 * 3  # old PNGs gone

    def boom(task):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(synth_ct, "_work", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_dataset(root, seed=0, **SMALL)
    assert not list((root / "Data-split").rglob("*.txt"))  # nothing can name a missing image
    assert not (root / "synth_info.json").exists()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(patients=5), ValueError, "too few"),
    (dict(patients=40, covid_fraction=0.05), ValueError, "too few"),
    (dict(size=31), ValueError, "size must be >= 32"),
    (dict(val_fraction=0.0), ValueError, r"val_fraction must be in \(0, 1\)"),
    (dict(test_fraction=1.2), ValueError, r"test_fraction must be in \(0, 1\)"),
    (dict(val_fraction=0.5, test_fraction=0.5), ValueError, "val_fraction \\+ test_fraction must be < 1"),
    (dict(covid_fraction=1.0), ValueError, "covid_fraction"),
    (dict(slices_per_patient=0), ValueError, "slices_per_patient must be >= 1"),
    (dict(workers=0), ValueError, "workers must be >= 1"),
    (dict(seed=-1), ValueError, "seed must be >= 0"),
    (dict(patients=12.5), TypeError, "patients must be an integer"),
])
def test_argument_errors(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        generate_dataset(tmp_path / "x", **{**SMALL, **kwargs})
    assert not (tmp_path / "x").exists()  # checked before anything is written


def test_window():
    assert window_to_uint8(np.array([-2000, -1250, -1000, 250, 900])).tolist() == [0, 0, 42, 255, 255]


# --- HU sanity on single slices --------------------------------------------------------------------

@pytest.fixture(scope="module")
def covid_slices():
    out = []
    for i, pattern in enumerate(["covid_mild", "covid_moderate", "covid_severe"] * 2):
        _, slices = simulate_patient(i, seed=5, label=1, size=96, slices_per_patient=3, pattern=pattern)
        out += slices
    return out


def test_hu_of_air_and_lungs():
    clean = []
    for i, pattern in enumerate(["normal", "nodule", "covid_moderate"]):
        _, slices = simulate_patient(i, seed=1, label=int(pattern.startswith("covid")), size=96,
                                     slices_per_patient=2, pattern=pattern)
        for s in slices:
            hu, lung = s["hu"], s["lung"] > 0
            assert hu.shape == (96, 96) and hu.dtype == np.float32
            assert -1040 < np.median(hu[:4]) < -960  # air above the patient
            assert lung.sum() > 0.04 * hu.size and {1, 2} <= set(np.unique(s["lung"]).tolist())
            inner = ndimage.binary_erosion(lung) & ~s["lesion"]  # off the pleura (partial volume)
            assert -920 < np.median(hu[inner]) < -740  # with the patient's calibration and noise
            clean.append(np.median(s["hu_clean"][inner]))
            assert np.array_equal(s["image"], window_to_uint8(hu))
    assert -875 < np.mean(clean) < -825  # lung parenchyma with its vessels


def test_covid_lesions_are_ggo_in_lungs_bilateral_and_peripheral(covid_slices):
    bilateral, periph = 0, []
    for s in covid_slices:
        les, lung = s["lesion"], s["lung"]
        assert les.any() and "ggo" in s["findings"]
        assert (lung[les] > 0).all()
        bilateral += (lung[les] == 1).any() and (lung[les] == 2).any()
        if s["ggo"].sum() >= 5:
            assert -720 < np.median(s["hu_clean"][s["ggo"]]) < -380
        depth = ndimage.distance_transform_edt(lung > 0)  # pixels to the pleura
        periph.append((depth[les].mean(), depth[lung > 0].mean()))
    assert bilateral >= 0.7 * len(covid_slices)
    lesion_depth, lung_depth = np.mean(periph, axis=0)
    assert lesion_depth < 0.85 * lung_depth  # (bronchopneumonia: ~1.4, nodules: ~1.3)
    assert sum(a < b for a, b in periph) >= 0.8 * len(periph)


def test_slices_of_a_patient_are_consistent(covid_slices):
    a, b = covid_slices[0], covid_slices[1]  # neighbouring slices of one patient
    body_a, body_b = a["hu_clean"] > -500, b["hu_clean"] > -500
    assert (body_a & body_b).sum() > 0.7 * (body_a | body_b).sum()  # same body, same place


def test_normal_slices_have_no_lesion():
    for i in range(2):
        _, slices = simulate_patient(i, seed=2, label=0, size=96, slices_per_patient=3, pattern="normal")
        for s in slices:
            assert not s["lesion"].any() and s["findings"] == ["normal"]
    with pytest.raises(ValueError, match="does not fit label"):
        simulate_patient(0, label=1, size=64, slices_per_patient=1, pattern="normal")


def test_noncovid_findings_are_tagged():
    for i, pattern in enumerate(["lobar", "nodule", "bronchopneumonia", "emphysema", "atelectasis"]):
        _, slices = simulate_patient(i, seed=4, label=0, size=64, slices_per_patient=4, pattern=pattern)
        tags = {t for s in slices for t in s["findings"]}
        assert pattern in tags, (pattern, tags)
        for s in slices:
            assert s["lesion"].any() == (s["findings"] != ["normal"])


def test_separable_but_not_by_global_brightness():
    feats = []
    for i in range(36):
        label = i % 2
        _, slices = simulate_patient(i, seed=9, label=label, size=64, slices_per_patient=2, masks=True)
        for s in slices:
            img = s["image"].astype(float)
            inner = img[ndimage.binary_erosion(s["lung"] > 0)]  # lung pixels off the pleura
            hazy = (inner > np.median(inner) + 20).mean()  # ~120 HU over the slice's own lung
            feats.append((label, img.mean(), hazy))
    y, glob, hazy = (np.array(v) for v in zip(*feats))
    assert hazy[y == 1].mean() > 1.5 * hazy[y == 0].mean()  # COVID: more hazy lung
    best = max(max(((glob > t) == y).mean(), ((glob <= t) == y).mean()) for t in np.unique(glob))
    assert best < 0.9, best  # one brightness threshold is not enough
