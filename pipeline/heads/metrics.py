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


def tuned_thresholds(Y: np.ndarray, scores: np.ndarray, default: float) -> tuple[np.ndarray, list[int]]:
    """Each class's threshold maximising its F1 on (Y, scores), an image carrying the class when its score
    reaches it; a class without a positive in `Y` keeps `default`. Returns the thresholds and those classes."""
    from sklearn.metrics import precision_recall_curve
    thresholds, untuned = np.full(Y.shape[1], float(default)), []
    for c in range(Y.shape[1]):
        if not Y[:, c].any():
            untuned.append(c)
            continue
        precision, recall, cuts = precision_recall_curve(Y[:, c], scores[:, c])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        thresholds[c] = float(cuts[int(np.argmax(f1))])
    return thresholds, untuned


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
