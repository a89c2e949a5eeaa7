"""Metrics for a model's evaluation split, and the rows DVC's confusion plot reads."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)


def evaluate(y_true: np.ndarray, scores: np.ndarray, classes: list[str], probabilities: bool) -> dict:
    """top1, top5 (more than 5 classes), balanced accuracy, macro F1, per-class precision and
    recall, and log loss when `scores` are probabilities. `scores` has one column per class."""
    labels = np.arange(len(classes))
    y_pred = scores.argmax(1)
    out = {"top1": accuracy_score(y_true, y_pred),
           "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
           "macro_f1": f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)}
    if len(classes) > 5:
        out["top5"] = top_k_accuracy_score(y_true, scores, k=5, labels=labels)
    if probabilities:
        p = np.clip(scores.astype(np.float64), 1e-15, 1)
        out["log_loss"] = log_loss(y_true, p / p.sum(1, keepdims=True), labels=labels)
    precision, recall, _, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                    zero_division=0)
    out["per_class"] = {c: {"precision": float(p), "recall": float(r), "support": int(s)}
                        for c, p, r, s in zip(classes, precision, recall, support)}
    return {k: (float(v) if not isinstance(v, dict) else v) for k, v in out.items()}


def headline(metrics: dict) -> str:
    """The figure a command prints of a trained head: its top-1, or a multi-label head's macro AP and F1."""
    if "macro_ap" in metrics:
        return f"macro AP {metrics['macro_ap']:.3f}, macro F1 {metrics['macro_f1']:.3f}"
    return f"top-1 {metrics['top1']:.3f}"


def confusion_rows(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> list[dict]:
    """One {actual, predicted} row per example, for DVC's `confusion` template."""
    return [{"actual": classes[a], "predicted": classes[p]} for a, p in zip(y_true, y_pred)]


def confusion_png(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay
    size = max(4, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=np.arange(len(classes)),
                                            display_labels=classes, ax=ax, colorbar=False,
                                            xticks_rotation="vertical")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def accuracy_interval(accuracy: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on `n` images: on 60 images, 0.967 reads
    as 0.886-0.991, so a 0.983 beside it is a tie."""
    from scipy.stats import binomtest
    ci = binomtest(int(round(accuracy * n)), n).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def macro_ap(Y: np.ndarray, scores: np.ndarray) -> float:
    """Mean over the classes with a positive in `Y` ([N, classes] 0/1) of their average precision: the score
    multi-label model selection maximises."""
    from sklearn.metrics import average_precision_score
    present = Y.sum(0) > 0
    return float(average_precision_score(Y[:, present], scores[:, present], average="macro"))


def weighted_macro_ap(Y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`macro_ap` of (Y, scores) under each row of `weights` ([B, N] image weights), at once: sklearn's
    average_precision_score with sample_weight, tied scores taken together, vectorised over the rows (one call
    per class and row would take minutes for a bootstrap). A class without a weighted positive is left out."""
    aps = []
    for c in range(Y.shape[1]):
        order = np.argsort(-scores[:, c], kind="stable")
        y, s = Y[order, c].astype(np.float64), scores[order, c]
        ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]   # the last image of each run of equal scores
        tp = np.cumsum(weights[:, order] * y, 1)[:, ends]
        seen = np.cumsum(weights[:, order], 1)[:, ends]
        positives = tp[:, -1:]
        recall = np.diff(tp, prepend=0, axis=1) / np.where(positives > 0, positives, 1)
        precision = tp / np.where(seen > 0, seen, 1)
        aps.append(np.where(positives[:, 0] > 0, (recall * precision).sum(1), np.nan))
    return np.nanmean(np.stack(aps, 1), 1)


def macro_ap_interval(Y: np.ndarray, scores: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `macro_ap(Y, scores)`, the images resampled with replacement: the
    multi-label counterpart of `accuracy_interval` (macro AP has no closed-form interval)."""
    n = len(Y)
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=resamples)
    low, high = np.percentile(weighted_macro_ap(Y, scores, weights), [2.5, 97.5])
    return float(low), float(high)


def best_f1(Y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each class's best F1 on (Y, scores), an image carrying the class when its score reaches a cut, and the
    cut reaching it (NaN both for a class without a positive in `Y`)."""
    from sklearn.metrics import precision_recall_curve
    f1s, cuts = np.full(Y.shape[1], np.nan), np.full(Y.shape[1], np.nan)
    for c in np.flatnonzero(Y.any(0)):
        precision, recall, at = precision_recall_curve(Y[:, c], scores[:, c])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        f1s[c], cuts[c] = f1.max(), at[int(np.argmax(f1))]
    return f1s, cuts


def tuned_thresholds(Y: np.ndarray, scores: np.ndarray, default: float) -> tuple[np.ndarray, list[int]]:
    """Each class's threshold maximising its F1 on (Y, scores); a class without a positive in `Y` keeps
    `default`. Returns the thresholds and those classes."""
    _, cuts = best_f1(Y, scores)
    untuned = [int(c) for c in np.flatnonzero(np.isnan(cuts))]
    return np.where(np.isnan(cuts), float(default), cuts), untuned


def half_best_f1_thresholds(Y: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Each class's threshold for calibrated probabilities: half the best F1 the class reaches on (Y,
    probabilities), the F1-maximising threshold of a calibrated classifier (Lipton, Elkan and Naryanaswamy,
    "Optimal thresholding of classifiers to maximize F1 measure", 2014). It rests on the F1 reached, not on
    where the few positives near the cut happen to lie, so it varies less from sample to sample than the score
    at which F1 peaks. A class without a positive in `Y` keeps 0.5. Returns the thresholds and those classes."""
    f1s, _ = best_f1(Y, probabilities)
    untuned = [int(c) for c in np.flatnonzero(np.isnan(f1s))]
    return np.where(np.isnan(f1s), 0.5, f1s / 2), untuned


def evaluate_multilabel(Y: np.ndarray, scores: np.ndarray, thresholds: np.ndarray, classes: list[str]) -> dict:
    """macro and micro AP (classes with a positive), macro and micro F1, subset accuracy and Hamming loss of
    the labels whose score reaches their class's threshold, and per class its AP, F1, precision, recall,
    threshold and support (`per_class`)."""
    from sklearn.metrics import average_precision_score, hamming_loss
    predicted = (scores >= thresholds).astype(np.uint8)
    present = Y.sum(0) > 0
    precision, recall, f1, support = precision_recall_fscore_support(Y, predicted, zero_division=0)
    out = {"macro_ap": macro_ap(Y, scores),
           "micro_ap": float(average_precision_score(Y[:, present], scores[:, present], average="micro")),
           "macro_f1": float(f1_score(Y, predicted, average="macro", zero_division=0)),
           "micro_f1": float(f1_score(Y, predicted, average="micro", zero_division=0)),
           "subset_accuracy": float(accuracy_score(Y, predicted)),
           "hamming_loss": float(hamming_loss(Y, predicted))}
    ap = [float(average_precision_score(Y[:, c], scores[:, c])) if present[c] else None for c in range(len(classes))]
    out["per_class"] = {c: {"ap": ap[i], "f1": float(f1[i]), "precision": float(precision[i]),
                            "recall": float(recall[i]), "threshold": float(thresholds[i]), "support": int(support[i])}
                        for i, c in enumerate(classes)}
    return out


def precision_recall_png(per_class: dict, path, title: str) -> None:
    """A multi-label model's confusion.png: each class's precision and recall at its threshold, as bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(per_class)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(names) + 2), 4))
    ax.bar(x - 0.2, [per_class[c]["precision"] for c in names], 0.4, label="precision")
    ax.bar(x + 0.2, [per_class[c]["recall"] for c in names], 0.4, label="recall")
    ax.set_xticks(x, names, rotation=90)
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
