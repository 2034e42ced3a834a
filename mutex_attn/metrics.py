"""Evaluation of binary COVID-19 classification (COVID = 1 = positive) on CT.

Everything here works on plain arrays of labels and scores, where a score is P(COVID) (any real
score works for the threshold-free parts: AUC, DeLong):

    binary_metrics(y_true, y_score, threshold=0.5)       # confusion counts, acc, sens, spec, prec, F1, AUC
    aggregate_patients(y_true, y_score, patients, rule)  # slice -> patient scores ("mean" or "vote")
    evaluate_predictions(y_true, y_score, patients)      # slice / patient (mean) / patient (vote) metrics
    format_metrics_table(results)                        # those as a fixed-width text table
    delong_test(y_true, score_a, score_b)                # DeLong's test for two correlated ROC AUCs
    delong_auc_ci(y_true, y_score, alpha=0.95)           # AUC with its DeLong confidence interval
    plot_roc / plot_confusion_matrix / plot_training_curves   # PNG files

Conventions
-----------
* A case is predicted positive when ``score >= threshold``.
* Values that are undefined for the data at hand are ``float("nan")``, never an exception or a
  warning: sensitivity without positives, specificity without negatives, precision without
  predicted positives, F1 when there are neither positives nor predicted positives
  (F1 = 2TP / (2TP + FP + FN), so it is 0 and not nan when precision alone is undefined), and the
  AUC when only one class is present.
* Results are plain Python ``int`` / ``float`` (``json.dumps`` writes nan as ``NaN``).
* Patient-level "vote": a patient's score is the fraction of its slices predicted positive, so
  thresholding it at 0.5 is a majority vote. A tie (exactly half the slices positive) is broken
  by the patient's mean slice probability: positive when the mean is ``>= threshold``, which
  keeps the score at exactly 0.5; negative otherwise, which lowers the score to the largest float
  below 0.5 (``VOTE_TIE_NEGATIVE``). The vote score is thus always decided by ``>= 0.5``.
* DeLong's test uses the O(n log n) algorithm of Sun & Xu (2014, IEEE Signal Processing Letters
  21(11)), with midranks for tied scores, which gives exactly the covariance estimator of
  DeLong, DeLong & Clarke-Pearson (1988, Biometrics 44(3)).

The plots use ``matplotlib.figure.Figure`` with the Agg canvas and never touch pyplot or the
global backend; matplotlib is imported only when a plot is made.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
from scipy.stats import norm
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

__all__ = [
    "VOTE_TIE_NEGATIVE",
    "DeLongResult",
    "aggregate_patients",
    "binary_metrics",
    "compute_midrank",
    "delong_auc_ci",
    "delong_roc_variance",
    "delong_test",
    "evaluate_predictions",
    "format_metrics_table",
    "plot_confusion_matrix",
    "plot_roc",
    "plot_training_curves",
]

#: The vote score of a patient whose tie (half its slices positive) was broken towards negative.
VOTE_TIE_NEGATIVE = float(np.nextafter(0.5, 0.0))

_NAN = float("nan")


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _to_numpy(a) -> np.ndarray:
    """An array from a list, numpy array or (CPU or CUDA) torch tensor, without importing torch."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _check_labels(y_true, name: str = "y_true") -> np.ndarray:
    y = _to_numpy(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{name} is empty")
    if y.dtype == bool:
        return y.astype(np.int64)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{name} must hold the labels 0 / 1 (numbers or booleans), got dtype {y.dtype}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        values = np.unique(y[bad])[:5].tolist()
        raise ValueError(f"{name} must hold only the labels 0 (non-COVID) and 1 (COVID); found {values}")
    return y.astype(np.int64)


def _check_scores(y_score, n: int, name: str = "y_score") -> np.ndarray:
    s = _to_numpy(y_score)
    if s.ndim != 1:
        hint = " (pass P(COVID), e.g. probs[:, 1])" if s.ndim == 2 else ""
        raise ValueError(f"{name} must be 1-D, got shape {s.shape}{hint}")
    if s.shape[0] != n:
        raise ValueError(f"{name} has {s.shape[0]} entries but y_true has {n}")
    if not (np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating) or s.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"{name} must be finite; {int((~np.isfinite(s)).sum())} entries are nan or inf")
    return s


def _check_threshold(threshold) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a real number, got {threshold!r}") from None
    if not math.isfinite(t):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return t


def _ratio(num: int, den: int) -> float:
    return num / den if den else _NAN


# --------------------------------------------------------------------------------------------
# slice- and patient-level metrics
# --------------------------------------------------------------------------------------------
def binary_metrics(y_true, y_score, threshold: float = 0.5) -> dict:
    """Confusion counts and the usual rates at one threshold, plus the ROC AUC.

    ``y_true`` holds 0 (non-COVID) / 1 (COVID), ``y_score`` P(COVID); a case is predicted
    positive when ``y_score >= threshold``. Returns a dict of plain ints / floats with the keys
    n, positives, negatives, tp, fp, tn, fn, accuracy, sensitivity, specificity, precision, f1,
    auc, threshold. Undefined values are nan (see the module docstring).
    """
    y = _check_labels(y_true)
    s = _check_scores(y_score, y.shape[0])
    t = _check_threshold(threshold)
    pred = (s >= t).astype(np.int64)
    (tn, fp), (fn, tp) = confusion_matrix(y, pred, labels=[0, 1]).tolist()
    n, positives = int(y.shape[0]), int(tp + fn)
    negatives = n - positives
    auc = float(roc_auc_score(y, s)) if 0 < positives < n else _NAN
    return {
        "n": n,
        "positives": positives,
        "negatives": negatives,
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
        "accuracy": (tp + tn) / n,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auc": auc,
        "threshold": t,
    }


def aggregate_patients(y_true, y_score, patients, rule: str = "mean", threshold: float = 0.5
                       ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Slice predictions -> one label and one score per patient.

    ``rule="mean"``: the patient score is the mean slice probability.
    ``rule="vote"``: the patient score is the fraction of slices with ``score >= threshold``, so
    ``>= 0.5`` is a majority vote; a tie is broken by the mean slice probability (positive when
    it is ``>= threshold``: the score stays 0.5; negative otherwise: the score becomes
    ``VOTE_TIE_NEGATIVE``, the largest float below 0.5).

    The patient label is the label of its slices; slices of one patient with different labels
    are a ``ValueError`` that names the patient(s). Returns ``(labels, scores, patient_ids)``
    ordered by patient id (numeric ids sort numerically, others as strings), ids as ``str``.
    """
    y = _check_labels(y_true)
    s = _check_scores(y_score, y.shape[0])
    t = _check_threshold(threshold)
    if rule not in ("mean", "vote"):
        raise ValueError(f"rule must be 'mean' or 'vote', got {rule!r}")
    p = _to_numpy(patients)
    if p.ndim != 1 or p.shape[0] != y.shape[0]:
        raise ValueError(f"patients must be 1-D with one id per slice ({y.shape[0]}), got shape {p.shape}")
    if not (np.issubdtype(p.dtype, np.integer) or p.dtype.kind in "US"):
        p = np.array([str(v) for v in p])          # mixed / object ids: compare as strings
    ids, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)

    positives = np.bincount(inverse, weights=y, minlength=ids.size)
    mixed = (positives > 0) & (positives < counts)
    if mixed.any():
        names = [str(v) for v in ids[mixed]]
        shown = ", ".join(names[:10]) + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")
        raise ValueError(f"slices of one patient carry different labels: patient(s) {shown}")
    labels = (positives == counts).astype(np.int64)

    mean = np.bincount(inverse, weights=s, minlength=ids.size) / counts
    if rule == "mean":
        scores = mean
    else:
        votes = np.bincount(inverse, weights=(s >= t).astype(np.float64), minlength=ids.size)
        scores = votes / counts
        tie_negative = (2 * votes == counts) & (mean < t)
        scores[tie_negative] = VOTE_TIE_NEGATIVE
    return labels, scores, [str(v) for v in ids]


def evaluate_predictions(y_true, y_score, patients=None, threshold: float = 0.5) -> dict:
    """``{"slice": ..., "patient_mean": ..., "patient_vote": ...}`` of :func:`binary_metrics`.

    The patient parts are present only when ``patients`` (one id per slice) is given.
    "patient_mean" thresholds the mean slice probability at ``threshold``; "patient_vote" counts
    the slices at ``threshold`` and thresholds the vote fraction at 0.5 (majority, ties broken
    by the mean probability), so its ``threshold`` entry is 0.5.
    """
    results = {"slice": binary_metrics(y_true, y_score, threshold)}
    if patients is not None:
        yp, sp, _ = aggregate_patients(y_true, y_score, patients, "mean", threshold)
        results["patient_mean"] = binary_metrics(yp, sp, threshold)
        yp, sp, _ = aggregate_patients(y_true, y_score, patients, "vote", threshold)
        results["patient_vote"] = binary_metrics(yp, sp, 0.5)
    return results


_TABLE_ROWS = {"slice": "slice", "patient_mean": "patient (mean)", "patient_vote": "patient (vote)"}
_TABLE_COLS = (("acc", "accuracy"), ("sens", "sensitivity"), ("spec", "specificity"),
               ("prec", "precision"), ("F1", "f1"), ("AUC", "auc"))


def format_metrics_table(results: Mapping[str, Mapping]) -> str:
    """A fixed-width text table of :func:`evaluate_predictions` results.

    Rows slice / patient (mean) / patient (vote) (those present, in that order, then any other
    entry that is a metrics dict, under its own name); columns n, acc, sens, spec, prec, F1, AUC
    with four decimals; undefined values are shown as "n/a".
    """
    keys = [k for k in _TABLE_ROWS if k in results]
    keys += [k for k, v in results.items() if k not in _TABLE_ROWS and isinstance(v, Mapping) and "n" in v]
    if not keys:
        raise ValueError("results holds no metrics (expected keys such as 'slice', 'patient_mean')")
    names = [_TABLE_ROWS.get(k, str(k)) for k in keys]
    w0 = max(len("level"), *(len(n) for n in names))

    def cell(v) -> str:
        v = float(v)
        return "n/a" if math.isnan(v) else f"{v:.4f}"

    header = f"{'level':<{w0}}  {'n':>6}" + "".join(f"  {c:>6}" for c, _ in _TABLE_COLS)
    lines = [header, "-" * len(header)]
    for k, name in zip(keys, names):
        m = results[k]
        lines.append(f"{name:<{w0}}  {int(m['n']):>6}" + "".join(f"  {cell(m[key]):>6}" for _, key in _TABLE_COLS))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# DeLong
# --------------------------------------------------------------------------------------------
class DeLongResult(NamedTuple):
    """DeLong's test of AUC(a) = AUC(b). ``variance`` is the variance of ``auc_diff``;
    ``covariance`` is the 2x2 covariance matrix of (auc_a, auc_b) as nested lists."""
    auc_a: float
    auc_b: float
    auc_diff: float
    z: float
    p_value: float
    variance: float
    covariance: list


def compute_midrank(x) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their mean rank (midranks), in O(n log n)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)                       # rank of the last element of each tie group
    mid = ends - (counts - 1) / 2.0
    return mid[inverse.reshape(-1)]


def _structural_components(y: np.ndarray, scores: np.ndarray):
    """AUCs and DeLong's structural components for k score vectors (rows of ``scores``).

    Sun & Xu (2014): with T_Z the midranks among all cases, T_X among the m positives and T_Y
    among the n negatives, V10(X_i) = (T_Z(X_i) - T_X(X_i)) / n and
    V01(Y_j) = 1 - (T_Z(Y_j) - T_Y(Y_j)) / m; the AUC is the mean of either.
    """
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    k = scores.shape[0]
    v10 = np.empty((k, m))
    v01 = np.empty((k, n))
    auc = np.empty(k)
    for r in range(k):
        tz = compute_midrank(scores[r])
        tx = compute_midrank(scores[r, pos])
        ty = compute_midrank(scores[r, neg])
        auc[r] = (tz[pos].sum() - m * (m + 1) / 2.0) / (m * n)
        v10[r] = (tz[pos] - tx) / n
        v01[r] = 1.0 - (tz[neg] - ty) / m
    return auc, v10, v01, m, n


def _check_delong_inputs(y_true, *scores) -> tuple[np.ndarray, np.ndarray]:
    y = _check_labels(y_true)
    names = ("score_a", "score_b") if len(scores) == 2 else ("y_score",)
    s = np.stack([_check_scores(v, y.shape[0], name) for v, name in zip(scores, names)])
    m = int(y.sum())
    n = y.shape[0] - m
    if m < 2 or n < 2:
        raise ValueError(
            f"DeLong's method needs at least 2 positive and 2 negative cases (both classes present); "
            f"got {m} positive and {n} negative"
        )
    return y, s


def delong_roc_variance(y_true, y_score) -> tuple[float, float]:
    """``(auc, variance)``: the AUC and DeLong's estimate of its variance, S10/m + S01/n."""
    y, s = _check_delong_inputs(y_true, y_score)
    auc, v10, v01, m, n = _structural_components(y, s)
    var = float(np.var(v10[0], ddof=1) / m + np.var(v01[0], ddof=1) / n)
    return float(auc[0]), var


def delong_test(y_true, score_a, score_b) -> DeLongResult:
    """DeLong's test for two correlated ROC AUCs computed on the same cases.

    z = (AUC_a - AUC_b) / sqrt(Var), Var = [1, -1] S [1, -1]^T with S = S10/m + S01/n (sample
    covariances, ddof 1, of the structural components); two-sided p = 2 * norm.sf(|z|).
    When the variance is 0: p = 1 (z = 0) if the AUCs are equal, else p = 0 (z = +-inf).
    Needs binary labels with at least two cases of each class and finite scores of equal length.
    """
    y, s = _check_delong_inputs(y_true, score_a, score_b)
    auc, v10, v01, m, n = _structural_components(y, s)
    cov = np.cov(v10) / m + np.cov(v01) / n
    # The variance of the difference from the differences of the components: the same number as
    # cov[0,0] + cov[1,1] - 2 cov[0,1], without its cancellation (exactly 0 for equal scores).
    var = float(np.var(v10[0] - v10[1], ddof=1) / m + np.var(v01[0] - v01[1], ddof=1) / n)
    diff = float(auc[0] - auc[1])
    if var > 0:
        z = diff / math.sqrt(var)
        p = float(min(1.0, 2.0 * norm.sf(abs(z))))
    elif abs(diff) <= 1e-12:
        z, p = 0.0, 1.0
    else:
        z, p = math.copysign(math.inf, diff), 0.0
    return DeLongResult(float(auc[0]), float(auc[1]), diff, float(z), p, var, cov.tolist())


def delong_auc_ci(y_true, y_score, alpha: float = 0.95) -> tuple[float, float, float]:
    """``(auc, low, high)``: the AUC and its two-sided ``alpha`` (confidence level, e.g. 0.95)
    normal confidence interval from DeLong's variance, clipped to [0, 1]."""
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha is the confidence level and must lie in (0, 1), got {alpha}")
    auc, var = delong_roc_variance(y_true, y_score)
    half = float(norm.ppf(0.5 + alpha / 2.0)) * math.sqrt(max(var, 0.0))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> None:
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


def plot_roc(curves: Mapping[str, tuple], path, title: str = "ROC") -> None:
    """ROC curves, one per entry ``name -> (y_true, y_score)`` with its AUC in the legend, and
    the diagonal chance line, saved as a PNG. Every curve needs both classes."""
    if not curves:
        raise ValueError("curves is empty: give at least one name -> (y_true, y_score)")
    prepared = []
    for name, pair in curves.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"curve {name!r} must be a pair (y_true, y_score)")
        y = _check_labels(pair[0], f"y_true of {name!r}")
        s = _check_scores(pair[1], y.shape[0], f"y_score of {name!r}")
        if y.min() == y.max():
            raise ValueError(f"curve {name!r} has only one class; a ROC curve needs both")
        fpr, tpr, _ = roc_curve(y, s)
        prepared.append((str(name), fpr, tpr, roc_auc_score(y, s)))

    fig = _new_figure((6, 6))
    ax = fig.add_subplot(1, 1, 1)
    for name, fpr, tpr, auc in prepared:
        ax.plot(fpr, tpr, lw=2, label=f"{name} (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def _as_confusion(metrics_or_cm) -> np.ndarray:
    if isinstance(metrics_or_cm, Mapping):
        try:
            return np.array([[metrics_or_cm["tn"], metrics_or_cm["fp"]],
                             [metrics_or_cm["fn"], metrics_or_cm["tp"]]], dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"metrics dict lacks the confusion count {e}") from None
    cm = _to_numpy(metrics_or_cm)
    if cm.shape != (2, 2):
        raise ValueError(f"a confusion matrix must be 2x2 [[tn, fp], [fn, tp]], got shape {cm.shape}")
    if not np.isfinite(cm.astype(np.float64)).all() or (cm < 0).any() or (cm != np.round(cm)).any():
        raise ValueError("confusion counts must be non-negative integers")
    return cm.astype(np.int64)


def plot_confusion_matrix(metrics_or_cm, path, labels: Sequence[str] = ("non-COVID", "COVID"),
                          title: str = "Confusion matrix") -> None:
    """The 2x2 confusion matrix (rows true class, columns predicted class), each cell with its
    count and its row-normalised percentage, saved as a PNG.

    ``metrics_or_cm``: a :func:`binary_metrics` dict (tp, fp, tn, fn) or a 2x2 array
    ``[[tn, fp], [fn, tp]]`` (scikit-learn's layout with labels [0, 1]).
    """
    cm = _as_confusion(metrics_or_cm)
    if len(labels) != 2:
        raise ValueError(f"labels must name the two classes (negative, positive), got {labels!r}")
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)

    fig = _new_figure((5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="row fraction")
    for i in range(2):
        for j in range(2):
            pct = f"{100 * frac[i, j]:.1f}%" if rows[i, 0] > 0 else "n/a"
            ax.text(j, i, f"{cm[i, j]}\n({pct})", ha="center", va="center", fontsize=12,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks([0, 1], [str(v) for v in labels])
    ax.set_yticks([0, 1], [str(v) for v in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def _read_numeric_csv(summary_csv) -> dict[str, np.ndarray]:
    """Columns of a CSV whose non-empty cells all parse as numbers (empty cells -> nan)."""
    with open(os.fspath(summary_csv), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{summary_csv}: no header row")
        rows = [r for r in reader if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{summary_csv}: no data rows")
    columns = {}
    for j, name in enumerate(h.strip() for h in header):
        values, ok = [], True
        for r in rows:
            cell = r[j].strip() if j < len(r) else ""
            if not cell:
                values.append(_NAN)
                continue
            try:
                values.append(float(cell))
            except ValueError:
                ok = False
                break
        col = np.array(values, dtype=np.float64)
        if ok and name and np.isfinite(col).any():
            columns[name] = col
    return columns


def _panel_of(name: str) -> int | None:
    """Which panel a training-summary column belongs to: 0 losses, 1 loss weights and gradient
    norm, 2 learning rate, 3 validation metrics; None for columns not plotted (epoch, counters,
    timings)."""
    low = name.lower()
    if ("weight" in low and "decay" not in low) or "grad_norm" in low:  # weight_ce, train_grad_norm
        return 1
    if low in ("lr", "learning_rate") or low.startswith("lr_") or low.endswith("_lr"):
        return 2
    if "loss" in low or low.startswith("train_"):
        return 0
    if low.startswith("val_") or low.startswith("valid_") or low.startswith("test_"):
        return 3
    return None


def plot_training_curves(summary_csv, path) -> None:
    """A 2x2 grid from a per-epoch CSV: losses (train_loss, train_ce, train_cs, val_loss, ...:
    columns naming a loss or starting with train_); loss weights and the gradient norm
    (weight_ce, train_weight_cs, train_grad_norm, ...); learning rate (lr); validation metrics (val_acc, val_auc,
    val_patient_auc, ...: other columns starting with val_ / valid_ / test_). Other columns
    (seconds, counters) are not drawn. The first three panels use a log scale when their values
    span more than a decade. Any subset of columns works: only columns that are present
    and numeric are drawn, empty cells are gaps; the x axis is ``epoch`` if present, else the
    row number (from 1)."""
    cols = _read_numeric_csv(summary_csv)
    x = cols.pop("epoch", None)
    n = len(next(iter(cols.values()))) if cols else (len(x) if x is not None else 0)
    if x is None or not np.isfinite(x).all():
        x = np.arange(1, n + 1, dtype=np.float64)
    panels: list[list[str]] = [[], [], [], []]
    for name in cols:
        k = _panel_of(name)
        if k is not None:
            panels[k].append(name)
    if not any(panels):
        raise ValueError(f"{summary_csv}: no numeric loss, weight, lr or validation column to plot "
                         f"(numeric columns: {sorted(cols)})")

    fig = _new_figure((11, 8))
    titles = ("losses", "loss weights, gradient norm", "learning rate", "validation metrics")
    for k, (title, names) in enumerate(zip(titles, panels)):
        ax = fig.add_subplot(2, 2, k + 1)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if not names:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        for name in names:
            ax.plot(x, cols[name], marker="o", ms=3, lw=1.5, label=name)
        finite = np.concatenate([cols[c][np.isfinite(cols[c])] for c in names])
        # Log scale where values span decades (lr schedules, an early val-loss spike, the
        # gradient norm next to loss weights of ~1); metrics in [0, 1] stay linear.
        if k != 3 and finite.size and finite.min() > 0 and finite.max() / finite.min() > 10:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
