"""Tests of mutex_attn.metrics: hand-computed confusion matrices, patient aggregation, DeLong's
test against an independent O(m*n) implementation of DeLong et al. (1988), CIs and the plots."""
import json
import math
import struct
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mutex_attn import metrics as M

NAN = float("nan")

# A hand example: labels, scores and, at threshold 0.5, predictions 1 1 0 0 1 1 0 1.
Y = [1, 1, 1, 0, 0, 0, 0, 1]
S = [0.9, 0.5, 0.3, 0.2, 0.5, 0.7, 0.1, 0.6]
# AUC by hand over the 4 x 4 (positive, negative) pairs, negatives {0.2, 0.5, 0.7, 0.1}:
# 0.9 -> 4, 0.5 -> 1 + 0.5 (tie) + 1 = 2.5, 0.3 -> 2, 0.6 -> 3; (4 + 2.5 + 2 + 3) / 16.
AUC_HAND = 11.5 / 16


def assert_metrics(got, want):
    assert set(got) == {"n", "positives", "negatives", "tp", "fp", "tn", "fn", "accuracy",
                        "sensitivity", "specificity", "precision", "f1", "auc", "threshold"}
    for key, value in want.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-12), key
            assert type(got[key]) is type(value), key


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --------------------------------------------------------------------------------------------
# binary_metrics
# --------------------------------------------------------------------------------------------
def test_binary_metrics_hand_example(no_warnings):
    got = M.binary_metrics(Y, S)
    assert_metrics(got, dict(n=8, positives=4, negatives=4, tp=3, fp=2, tn=2, fn=1,
                             accuracy=0.625, sensitivity=0.75, specificity=0.5, precision=0.6,
                             f1=6 / 9, auc=AUC_HAND, threshold=0.5))
    json.dumps(got)  # plain Python types


def test_binary_metrics_threshold_boundary(no_warnings):
    # Two scores equal 0.5: at threshold 0.5 they are positive (>=), just above it negative.
    got = M.binary_metrics(Y, S, threshold=0.5000001)
    assert_metrics(got, dict(tp=2, fp=1, tn=3, fn=2, accuracy=0.625, sensitivity=0.5,
                             specificity=0.75, precision=2 / 3, f1=4 / 7, auc=AUC_HAND,
                             threshold=0.5000001))
    # Boundary on a single case: score == threshold is positive.
    assert M.binary_metrics([1, 0], [0.3, 0.1], threshold=0.3)["tp"] == 1
    assert M.binary_metrics([1, 0], [0.3, 0.1], threshold=np.nextafter(0.3, 1))["tp"] == 0


def test_binary_metrics_all_negative_predictions(no_warnings):
    got = M.binary_metrics(Y, S, threshold=0.95)
    assert_metrics(got, dict(tp=0, fp=0, tn=4, fn=4, accuracy=0.5, sensitivity=0.0,
                             specificity=1.0, precision=NAN, f1=0.0, auc=AUC_HAND))


def test_binary_metrics_single_class(no_warnings):
    got = M.binary_metrics([0, 0, 0], [0.2, 0.7, 0.4])
    assert_metrics(got, dict(n=3, positives=0, negatives=3, tp=0, fp=1, tn=2, fn=0,
                             accuracy=2 / 3, sensitivity=NAN, specificity=2 / 3, precision=0.0,
                             f1=0.0, auc=NAN))
    # Neither positives nor predicted positives: F1 is undefined too.
    got = M.binary_metrics([0, 0], [0.1, 0.2])
    assert_metrics(got, dict(tp=0, fp=0, tn=2, fn=0, accuracy=1.0, sensitivity=NAN,
                             specificity=1.0, precision=NAN, f1=NAN, auc=NAN))
    got = M.binary_metrics([1, 1], [0.9, 0.2])
    assert_metrics(got, dict(tp=1, fp=0, tn=0, fn=1, accuracy=0.5, sensitivity=0.5,
                             specificity=NAN, precision=1.0, f1=2 / 3, auc=NAN))


def test_binary_metrics_input_types():
    want = M.binary_metrics(Y, S)
    got = M.binary_metrics(np.array(Y, dtype=bool), np.array(S, dtype=np.float32))
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (want["tp"], want["fp"], want["tn"], want["fn"])
    torch = pytest.importorskip("torch")
    got = M.binary_metrics(torch.tensor(Y), torch.tensor(S, dtype=torch.float64, requires_grad=True))
    assert got == want


@pytest.mark.parametrize("y, s, kw, match", [
    ([0, 1, 2], [0.1, 0.2, 0.3], {}, "labels 0"),
    ([0, 1, 0.5], [0.1, 0.2, 0.3], {}, "labels 0"),
    (["a", "b"], [0.1, 0.2], {}, "labels 0"),
    ([0, 1], [0.1, 0.2, 0.3], {}, "3 entries"),
    ([0, 1], [0.1, NAN], {}, "finite"),
    ([0, 1], [0.1, np.inf], {}, "finite"),
    ([[0, 1]], [[0.1, 0.2]], {}, "1-D"),
    ([0, 1], [[0.9, 0.1], [0.2, 0.8]], {}, r"probs\[:, 1\]"),
    ([], [], {}, "empty"),
    ([0, 1], [0.1, 0.2], {"threshold": NAN}, "threshold"),
    ([0, 1], [0.1, 0.2], {"threshold": "high"}, "threshold"),
])
def test_binary_metrics_validation(y, s, kw, match):
    with pytest.raises(ValueError, match=match):
        M.binary_metrics(y, s, **kw)


# --------------------------------------------------------------------------------------------
# patient aggregation
# --------------------------------------------------------------------------------------------
# p2: label 1, slices 0.9 0.8 0.1 -> mean 0.6, vote 2/3
# p1: label 0, slices 0.6 0.2 -> a 1-1 tie, mean 0.4 < 0.5 -> negative
# p3: label 1, slices 0.55 0.45 0.9 0.3 -> a 2-2 tie, mean 0.55 >= 0.5 -> positive (0.5)
# p0: label 0, slices 0.1 0.2 -> mean 0.15, vote 0
PAT = ["p2", "p1", "p3", "p0", "p2", "p3", "p1", "p3", "p0", "p2", "p3"]
PAT_Y = [1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 1]
PAT_S = [0.9, 0.6, 0.55, 0.1, 0.8, 0.45, 0.2, 0.9, 0.2, 0.1, 0.3]


def test_aggregate_mean():
    labels, scores, ids = M.aggregate_patients(PAT_Y, PAT_S, PAT, rule="mean")
    assert ids == ["p0", "p1", "p2", "p3"]
    assert labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(scores, [0.15, 0.4, 0.6, 0.55], rtol=0, atol=1e-12)


def test_aggregate_vote_and_tie_rule():
    labels, scores, ids = M.aggregate_patients(PAT_Y, PAT_S, PAT, rule="vote")
    assert ids == ["p0", "p1", "p2", "p3"]
    assert labels.tolist() == [0, 0, 1, 1]
    assert scores[0] == 0.0
    assert scores[1] == M.VOTE_TIE_NEGATIVE == np.nextafter(0.5, 0) and scores[1] < 0.5
    assert scores[2] == pytest.approx(2 / 3, abs=1e-15)
    assert scores[3] == 0.5
    assert ((scores >= 0.5).astype(int)).tolist() == [0, 0, 1, 1]
    # The slice threshold decides the votes and the tie: at 0.35, p1 is still a 1-1 tie but its
    # mean 0.4 >= 0.35 makes it positive; p0 gets no votes; p3 has 3 of 4.
    _, scores, _ = M.aggregate_patients(PAT_Y, PAT_S, PAT, rule="vote", threshold=0.35)
    np.testing.assert_allclose(scores, [0.0, 0.5, 2 / 3, 0.75], rtol=0, atol=1e-15)


def test_aggregate_ordering_of_numeric_ids():
    labels, scores, ids = M.aggregate_patients([1, 0, 0, 1], [0.8, 0.2, 0.4, 0.6], [10, 2, 2, 10])
    assert ids == ["2", "10"]          # numeric ids sort numerically, returned as str
    assert labels.tolist() == [0, 1]
    np.testing.assert_allclose(scores, [0.3, 0.7])


def test_aggregate_mixed_label_patient():
    with pytest.raises(ValueError, match="p7"):
        M.aggregate_patients([1, 0, 1, 1], [0.2, 0.3, 0.4, 0.5], ["p7", "p7", "p8", "p8"])


def test_aggregate_validation():
    with pytest.raises(ValueError, match="rule"):
        M.aggregate_patients(Y, S, list(range(8)), rule="max")
    with pytest.raises(ValueError, match="one id per slice"):
        M.aggregate_patients(Y, S, list(range(7)))


def test_evaluate_predictions():
    only_slices = M.evaluate_predictions(PAT_Y, PAT_S)
    assert list(only_slices) == ["slice"]
    res = M.evaluate_predictions(PAT_Y, PAT_S, patients=PAT, threshold=0.5)
    assert list(res) == ["slice", "patient_mean", "patient_vote"]
    assert res["slice"] == M.binary_metrics(PAT_Y, PAT_S)
    # patient (mean): scores 0.15 0.4 0.6 0.55 labels 0 0 1 1 -> all right, AUC 1
    assert_metrics(res["patient_mean"], dict(n=4, tp=2, fp=0, tn=2, fn=0, accuracy=1.0, auc=1.0,
                                             threshold=0.5))
    # patient (vote): scores 0 0.5- 2/3 0.5, thresholded at 0.5 -> all right
    assert_metrics(res["patient_vote"], dict(n=4, tp=2, fp=0, tn=2, fn=0, accuracy=1.0, auc=1.0,
                                             threshold=0.5))
    json.dumps(res)


def test_format_metrics_table():
    res = M.evaluate_predictions(Y, S, patients=["a", "a", "b", "c", "c", "d", "d", "b"])
    table = M.format_metrics_table(res)
    lines = table.splitlines()
    assert len(lines) == 5
    assert len({len(line) for line in lines}) == 1          # fixed width
    for word in ("n", "acc", "sens", "spec", "prec", "F1", "AUC"):
        assert word in lines[0].split()
    assert lines[2].startswith("slice") and "0.6250" in lines[2] and "0.7188" in lines[2]
    assert lines[3].startswith("patient (mean)") and lines[4].startswith("patient (vote)")
    nan_table = M.format_metrics_table({"slice": M.binary_metrics([0, 0], [0.1, 0.2])})
    assert "n/a" in nan_table
    with pytest.raises(ValueError):
        M.format_metrics_table({})


# --------------------------------------------------------------------------------------------
# DeLong
# --------------------------------------------------------------------------------------------
def delong_reference(y, a, b):
    """DeLong, DeLong & Clarke-Pearson (1988) straight from the definition, O(m*n)."""
    y = np.asarray(y)
    v10, v01, aucs = [], [], []
    for s in (np.asarray(a, float), np.asarray(b, float)):
        x, z = s[y == 1], s[y == 0]                 # X: positives (m), Y: negatives (n)
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    m, n = len(v10[0]), len(v01[0])

    def sample_cov(u, v):
        return float(np.sum((u - u.mean()) * (v - v.mean())) / (len(u) - 1))

    s = [[sample_cov(v10[i], v10[j]) / m + sample_cov(v01[i], v01[j]) / n for j in range(2)]
         for i in range(2)]
    var = s[0][0] + s[1][1] - 2 * s[0][1]
    z = (aucs[0] - aucs[1]) / math.sqrt(var)
    p = math.erfc(abs(z) / math.sqrt(2))
    return aucs, s, var, z, p


def correlated_scores(rng, n, decimals=1):
    y = rng.permutation(np.r_[np.ones(n // 2 + 3, int), np.zeros(n - n // 2 - 3, int)])
    common = rng.normal(size=n)
    a = np.round(0.9 * y + common + 0.6 * rng.normal(size=n), decimals)
    b = np.round(0.5 * y + 0.8 * common + 0.7 * rng.normal(size=n), decimals)
    return y, a, b


def test_compute_midrank():
    np.testing.assert_array_equal(M.compute_midrank([3.0, 1.0, 3.0, 2.0, 3.0, 0.5]),
                                  [5.0, 2.0, 5.0, 3.0, 5.0, 1.0])
    np.testing.assert_array_equal(M.compute_midrank([2, 2]), [1.5, 1.5])


@pytest.mark.parametrize("seed", range(6))
def test_delong_matches_definition(seed):
    rng = np.random.default_rng(seed)
    y, a, b = correlated_scores(rng, n=40 + 37 * seed, decimals=1)   # rounding: many ties
    assert len(np.unique(a)) < len(a)
    got = M.delong_test(y, a, b)
    aucs, s, var, z, p = delong_reference(y, a, b)
    assert got.auc_a == pytest.approx(aucs[0], abs=1e-12)
    assert got.auc_b == pytest.approx(aucs[1], abs=1e-12)
    assert got.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert got.auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert got.auc_diff == pytest.approx(aucs[0] - aucs[1], abs=1e-12)
    np.testing.assert_allclose(got.covariance, s, rtol=1e-10, atol=1e-14)
    assert got.variance == pytest.approx(var, rel=1e-10, abs=1e-14)
    assert got.z == pytest.approx(z, rel=1e-9, abs=1e-10)
    assert got.p_value == pytest.approx(p, rel=1e-9, abs=1e-10)
    # the single-model variance is the diagonal
    auc_a, var_a = M.delong_roc_variance(y, a)
    assert auc_a == pytest.approx(aucs[0], abs=1e-12)
    assert var_a == pytest.approx(s[0][0], rel=1e-10)


def test_delong_symmetry_and_invariance():
    y, a, b = correlated_scores(np.random.default_rng(7), n=120, decimals=2)
    ab, ba = M.delong_test(y, a, b), M.delong_test(y, b, a)
    assert ab.z == pytest.approx(-ba.z, rel=1e-12)
    assert ab.p_value == pytest.approx(ba.p_value, rel=1e-12)
    # AUCs and the test depend only on the ordering of the scores
    mono = M.delong_test(y, np.exp(a), 3 * b - 1)
    assert mono.z == pytest.approx(ab.z, rel=1e-12)
    assert mono.auc_a == pytest.approx(ab.auc_a, abs=1e-15)


def test_delong_identical_scores_p_is_one():
    y, a, _ = correlated_scores(np.random.default_rng(3), n=60)
    res = M.delong_test(y, a, a.copy())
    assert res.p_value == 1.0 and res.z == 0.0 and res.variance == 0.0 and res.auc_diff == 0.0


def test_delong_zero_variance_cases():
    y = np.array([0, 0, 0, 1, 1, 1])
    perfect = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    also_perfect = np.array([0.0, 0.5, 0.1, 2.0, 3.0, 0.6])
    assert M.delong_test(y, perfect, also_perfect).p_value == 1.0
    res = M.delong_test(y, perfect, np.zeros(6))          # AUC 1 vs 0.5, both constant components
    assert res.auc_diff == 0.5 and res.variance == 0.0 and res.p_value == 0.0 and res.z == math.inf


def test_delong_strongly_better_model():
    rng = np.random.default_rng(11)
    y = np.r_[np.ones(150, int), np.zeros(150, int)]
    good = y + 0.5 * rng.normal(size=300)
    noise = rng.normal(size=300)
    res = M.delong_test(y, good, noise)
    assert res.auc_a > 0.9 and abs(res.auc_b - 0.5) < 0.1
    assert res.p_value < 0.01 and res.z > 0


@pytest.mark.parametrize("args, match", [
    (([0, 0, 0, 0], [1, 2, 3, 4], [1, 2, 3, 4]), "at least 2 positive"),
    (([0, 1, 0, 0], [1, 2, 3, 4], [1, 2, 3, 4]), "at least 2 positive"),
    (([0, 1, 0, 1], [1, 2, 3], [1, 2, 3, 4]), "score_a has 3 entries"),
    (([0, 1, 0, 1], [1, 2, 3, 4], [1, 2, 3]), "score_b has 3 entries"),
    (([0, 1, 0, 1], [1, 2, NAN, 4], [1, 2, 3, 4]), "finite"),
    (([0, 1, 0, 3], [1, 2, 3, 4], [1, 2, 3, 4]), "labels 0"),
])
def test_delong_validation(args, match):
    with pytest.raises(ValueError, match=match):
        M.delong_test(*args)


def test_delong_auc_ci():
    rng = np.random.default_rng(5)

    def sample(n):
        y = np.r_[np.ones(n // 2, int), np.zeros(n - n // 2, int)]
        return y, np.round(y + rng.normal(size=n), 1)

    y, s = sample(60)
    auc, low, high = M.delong_auc_ci(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert 0.0 <= low < auc < high <= 1.0
    _, var = M.delong_roc_variance(y, s)
    assert high - low == pytest.approx(2 * 1.959963984540054 * math.sqrt(var), rel=1e-9)
    auc99, low99, high99 = M.delong_auc_ci(y, s, alpha=0.99)
    assert low99 < low and high99 > high
    y_big, s_big = sample(2000)
    auc_big, low_big, high_big = M.delong_auc_ci(y_big, s_big)
    assert low_big < auc_big < high_big
    assert high_big - low_big < 0.5 * (high - low)
    # clipped to [0, 1]; a perfect classifier has zero variance
    assert M.delong_auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, 1.0, 1.0)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            M.delong_auc_ci(y, s, alpha=bad)


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 200 <= width <= 3000 and 200 <= height <= 3000, (width, height)
    assert len(data) > 5000
    return width, height


def test_plot_roc(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    curves = {"slice": (y, y + rng.normal(size=200)),
              "patient (mean)": (y[:50], y[:50] + 0.5 * rng.normal(size=50))}
    out = tmp_path / "sub" / "roc.png"
    M.plot_roc(curves, out, title="test ROC")
    png_size(out)
    with pytest.raises(ValueError, match="one class"):
        M.plot_roc({"bad": ([0, 0], [0.1, 0.2])}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        M.plot_roc({}, tmp_path / "x.png")


def test_plot_confusion_matrix(tmp_path):
    M.plot_confusion_matrix(M.binary_metrics(Y, S), tmp_path / "cm.png")
    png_size(tmp_path / "cm.png")
    M.plot_confusion_matrix(np.array([[0, 0], [3, 5]]), str(tmp_path / "cm2.png"), title="no negatives")
    png_size(tmp_path / "cm2.png")
    with pytest.raises(ValueError, match="2x2"):
        M.plot_confusion_matrix(np.zeros((3, 3)), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="tp"):
        M.plot_confusion_matrix({"tn": 1, "fp": 2, "fn": 3}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="non-negative"):
        M.plot_confusion_matrix([[1, -2], [3, 4]], tmp_path / "bad.png")


def test_plot_training_curves_full(tmp_path):
    csv_path = tmp_path / "summary.csv"
    header = "epoch,train_loss,train_ce,train_cs,weight_ce,weight_cs,lr,val_loss,val_acc,val_auc,val_patient_auc"
    rows = [f"{e},{1 / e},{0.8 / e},{0.2 / e},{0.5 + 0.01 * e},{0.5 - 0.01 * e},{0.01 * 0.9 ** e},"
            f"{1.1 / e},{0.6 + 0.02 * e},{0.7 + 0.02 * e},{0.72 + 0.02 * e}" for e in range(1, 11)]
    csv_path.write_text("\n".join([header, *rows]) + "\n")
    M.plot_training_curves(csv_path, tmp_path / "curves.png")
    png_size(tmp_path / "curves.png")


def test_training_curve_panels():
    # 0 losses, 1 loss weights and gradient norm, 2 learning rate, 3 validation metrics, None not drawn
    want = {"train_loss": 0, "train_ce": 0, "train_cs": 0, "val_loss": 0, "weight_ce": 1,
            "train_grad_norm": 1,
            "weight_cs": 1, "train_weight_ce": 1, "train_weight_cs": 1, "lr": 2, "val_acc": 3,
            "val_accuracy": 3, "val_auc": 3, "val_patient_auc": 3, "seconds": None,
            "weight_decay": None}
    assert {name: M._panel_of(name) for name in want} == want


def test_plot_training_curves_partial_columns(tmp_path):
    csv_path = tmp_path / "summary.csv"
    # no epoch, weights, lr or val_loss; empty cells; a text column that is ignored
    csv_path.write_text("train_loss,val_auc,phase\n0.9,,warmup\n0.7,0.71,main\n0.5,0.78,main\n")
    M.plot_training_curves(str(csv_path), tmp_path / "partial.png")
    png_size(tmp_path / "partial.png")
    only_text = tmp_path / "text.csv"
    only_text.write_text("epoch,phase\n1,warmup\n")
    with pytest.raises(ValueError, match="no numeric"):
        M.plot_training_curves(only_text, tmp_path / "x.png")
    empty = tmp_path / "empty.csv"
    empty.write_text("epoch,train_loss\n")
    with pytest.raises(ValueError, match="no data rows"):
        M.plot_training_curves(empty, tmp_path / "x.png")


def test_plots_leave_pyplot_and_backend_alone(tmp_path):
    import sys

    import matplotlib
    had_pyplot = "matplotlib.pyplot" in sys.modules
    backend = dict.__getitem__(matplotlib.rcParams, "backend")   # raw value, no resolution
    M.plot_confusion_matrix([[1, 2], [3, 4]], tmp_path / "cm.png")
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
