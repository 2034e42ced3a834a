"""evaluate, cam, ablate and the command line, end to end on a tiny synthetic CT set."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mutex_attn.cli import main
from mutex_attn.data.datasets import load_dataset
from mutex_attn.evaluate import evaluate
from mutex_attn.metrics import binary_metrics, delong_test
from mutex_attn.train import train

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tiny_ct(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synth"
    assert main(["synth", "--out", str(out), "--patients", "12", "--slices-per-patient", "2",
                 "--size", "48", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def two_runs(tiny_ct, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # clip_grad: ResNet-50 from scratch on 32 px images takes huge first steps, after which
    # BatchNorm's running statistics (used in eval) do not fit the weights for a while.
    common = dict(data=str(tiny_ct), img_size=32, batch_size=4, epochs=1, max_steps_per_epoch=3,
                  workers=0, progress=False, clip_grad=1.0)
    train({**common, "output": str(root / "manet")}, log=lambda *a: None)
    train({**common, "output": str(root / "resnet"), "model": "resnet50"}, log=lambda *a: None)
    return root / "manet", root / "resnet"


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_evaluate_writes_a_consistent_report(tiny_ct, two_runs, tmp_path):
    manet, _ = two_runs
    report = evaluate(manet, output=str(tmp_path / "eval"), progress=False, workers=0,
                      log=lambda *a: None)
    out = tmp_path / "eval"
    assert {"metrics.json", "predictions.csv", "roc.png", "confusion_slice.png",
            "confusion_patient.png"} <= {p.name for p in out.iterdir()}
    rows = read_csv(out / "predictions.csv")
    test = load_dataset(tiny_ct, "test")
    assert [r["image"] for r in rows] == [s.source for s in test]
    assert [int(r["label"]) for r in rows] == [s.label for s in test]
    # the metrics are those of the written predictions
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["prob_covid"]) for r in rows])
    saved = json.loads((out / "metrics.json").read_text())
    expect = binary_metrics(y, p)
    for key in ("tp", "fp", "tn", "fn", "accuracy", "auc"):
        assert saved["slice"][key] == pytest.approx(expect[key]), key
    n_patients = len({s.patient for s in test})
    assert saved["patient_mean"]["n"] == saved["patient_vote"]["n"] == n_patients
    low, high = saved["slice"]["auc_ci95"]
    assert low <= saved["slice"]["auc"] <= high
    assert report["split"] == "test" and report["epoch"] == 1


def test_evaluate_compare_gives_delong_p(two_runs, tmp_path):
    manet, resnet = two_runs
    a = evaluate(manet, output=str(tmp_path / "a"), progress=False, workers=0, log=lambda *a: None)
    evaluate(resnet, output=str(tmp_path / "b"), progress=False, workers=0, log=lambda *a: None)
    c = evaluate(manet, output=str(tmp_path / "c"), compare=str(tmp_path / "b"), progress=False,
                 workers=0, log=lambda *a: None)
    rows_a, rows_b = read_csv(tmp_path / "a" / "predictions.csv"), read_csv(tmp_path / "b" / "predictions.csv")
    y = np.array([int(r["label"]) for r in rows_a])
    want = delong_test(y, np.array([float(r["prob_covid"]) for r in rows_a]),
                       np.array([float(r["prob_covid"]) for r in rows_b]))
    got = c["compare"]["slice"]
    assert got["p_value"] == pytest.approx(want.p_value) and 0.0 <= got["p_value"] <= 1.0
    assert got["auc_a"] == pytest.approx(a["slice"]["auc"])
    # comparing with a run folder evaluates it on the same split first
    d = evaluate(manet, output=str(tmp_path / "d"), compare=str(resnet), progress=False,
                 workers=0, log=lambda *a: None)
    assert d["compare"]["slice"]["p_value"] == pytest.approx(want.p_value)


def test_compare_refuses_different_images(two_runs, tmp_path):
    manet, _ = two_runs
    evaluate(manet, split="val", output=str(tmp_path / "val"), progress=False, workers=0,
             log=lambda *a: None)
    with pytest.raises(ValueError, match="same images"):
        evaluate(manet, output=str(tmp_path / "t"), compare=str(tmp_path / "val"),
                 progress=False, workers=0, log=lambda *a: None)


def test_cam_panels_and_attention_views(tiny_ct, two_runs, tmp_path):
    from mutex_attn.cam import attention_views, grad_cam, run_cam
    from mutex_attn.train import load_checkpoint, model_from_checkpoint

    manet, resnet = two_runs
    files = run_cam(manet, count=2, output=str(tmp_path / "cam"), log=lambda *a: None)
    assert len(files) == 2 and all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
    files = run_cam(resnet, count=1, output=str(tmp_path / "cam_resnet"), log=lambda *a: None)
    assert len(files) == 1

    model, _ = model_from_checkpoint(load_checkpoint(manet))
    x, partner = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    views = attention_views(model, x, partner)
    assert list(views) == ["features", "after MAB", "after FAB"]
    for m in views.values():
        assert m.shape == (2, 64, 64) and m.min() >= 0 and m.max() <= 1 and m.max() == pytest.approx(1)
    cam = grad_cam(model, x)
    assert cam.shape == (2, 64, 64) and np.isfinite(cam).all()


def test_cli_train_with_yaml_config_and_flags(tiny_ct, tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("img-size: 32\nbatch_size: 4\nepochs: 3\nworkers: 0\nmax_steps_per_epoch: 1\nlr: 0.02\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data", str(tiny_ct), "--epochs", "1",
                 "--no-fab", "--no-progress", "--output", str(out)]) == 0
    saved = torch.load(out / "last.pt", weights_only=True)["config"]
    assert saved["epochs"] == 1 and saved["lr"] == 0.02 and saved["img_size"] == 32
    assert saved["blocks"] == "mab"
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    assert main(["train", "--config", str(bad), "--data", str(tiny_ct)]) == 2
    err = capsys.readouterr().err
    assert "unknown setting(s) ['epochz']" in err and "MUTEX_ATTN_TRACEBACK=1" in err
    monkeypatch.setenv("MUTEX_ATTN_TRACEBACK", "1")  # the traceback, for errors from deeper down
    with pytest.raises(ValueError, match="epochz"):
        main(["train", "--config", str(bad), "--data", str(tiny_ct)])


def test_ablate_writes_one_table(tiny_ct, tmp_path):
    out = tmp_path / "abl"
    assert main(["ablate", "--data", str(tiny_ct), "--output", str(out), "--studies", "blocks",
                 "--img-size", "32", "-b", "4", "--epochs", "1", "--max-steps-per-epoch", "1",
                 "--workers", "0", "--clip-grad", "1", "--no-progress"]) == 0
    rows = read_csv(out / "ablation.csv")
    assert [r["blocks"] for r in rows] == ["none", "mab", "mab+fab"]
    assert {r["loss"] for r in rows} == {"adaptive"}
    assert rows[-1]["p_vs_full"] == "nan" and 0.0 <= float(rows[0]["p_vs_full"]) <= 1.0
    table = (out / "ablation.md").read_text()
    assert table.count("\n| blocks |") == 3


def test_python_m_entry_point_help():
    run = subprocess.run([sys.executable, "-m", "mutex_attn", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0
    for command in ("synth", "train", "evaluate", "cam", "ablate"):
        assert command in run.stdout
