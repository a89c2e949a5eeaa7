"""How many labels are enough: accuracy on the evaluation split against training images per class.

For 1, 2, 5, 10, 20, 50, ... images per class (then all of them), each seed draws that many training
images of every class (all of a class that has fewer), fits a cheap head on them and scores it on the
evaluation split; the mean and spread over seeds show whether labelling more is worth it.

On a multi-label cache (labels: a [N, classes] 0/1 matrix) the heads learn every class at once (logreg one
binary head per class, knn neighbour votes per class), a class's images are those carrying it (an image drawn
for two classes is fitted once), the last point fits every training image, and the score is macro average
precision (`measure`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neighbors import KNeighborsClassifier

from pipeline.auditing.label_issues import l2_normalised
from pipeline.heads.metrics import macro_ap
from pipeline.heads.multilabel import label_scores
from pipeline.heads.torch_heads import TorchLogReg

HEADS = ("logreg", "knn")


@dataclass
class Point:
    head: str
    per_class: int
    mean: float
    std: float
    runs: int


def counts_up_to(largest: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... below `largest`, then `largest` itself (all images)."""
    out, step = [], 0
    while (n := (1, 2, 5)[step % 3] * 10 ** (step // 3)) < largest:
        out.append(n)
        step += 1
    return out + [largest]


def measure(y: np.ndarray) -> str:
    """The score of the curve of labels `y`."""
    return "macro AP" if y.ndim == 2 else "accuracy"


def _head(name: str, n_rows: int, C: float, multi_label: bool):
    if name == "knn":
        return KNeighborsClassifier(n_neighbors=min(5, n_rows), weights="distance", metric="cosine")
    return OneVsRestClassifier(TorchLogReg(C=C, device="cpu")) if multi_label else TorchLogReg(C=C, device="cpu")


def _score(model, X_eval: np.ndarray, y_eval: np.ndarray) -> float:
    if y_eval.ndim == 2:
        return macro_ap(y_eval, label_scores(model, X_eval))
    return float(np.mean(model.predict(X_eval) == y_eval))


def learning_curve(X: np.ndarray, y: np.ndarray, X_eval: np.ndarray, y_eval: np.ndarray,
                   heads: tuple[str, ...] = HEADS, seeds: int = 5, C: float = 10.0) -> list[Point]:
    """One Point per head and count; the last count (all images) is one run, the same for every seed.
    A multi-label curve scores the classes with a training image; none when no such class is in `y_eval`."""
    X, X_eval = l2_normalised(np.asarray(X, np.float32)), l2_normalised(np.asarray(X_eval, np.float32))
    multi_label = y.ndim == 2
    if multi_label:
        learnt = y.any(0)
        y, y_eval = y[:, learnt], y_eval[:, learnt]
        if not y_eval.any():
            return []
    by_class = [np.flatnonzero(c) for c in y.T] if multi_label else [np.flatnonzero(y == c) for c in np.unique(y)]
    counts = counts_up_to(max(len(rows) for rows in by_class))
    points = []
    for name in heads:
        for n in counts:
            scores = []
            for seed in range(seeds if n < counts[-1] else 1):
                rng = np.random.default_rng(seed)
                rows = np.concatenate([rng.choice(r, min(n, len(r)), replace=False) for r in by_class])
                if multi_label:
                    rows = np.unique(rows) if n < counts[-1] else np.arange(len(y))
                with warnings.catch_warnings():   # a class on every drawn image: a constant, as it should be
                    warnings.filterwarnings("ignore", category=UserWarning, module="sklearn.multiclass")
                    model = _head(name, len(rows), C, multi_label).fit(X[rows], y[rows])
                scores.append(_score(model, X_eval, y_eval))
            points.append(Point(name, n, float(np.mean(scores)), float(np.std(scores)), len(scores)))
    return points


def plot(points: list[Point], eval_split: str, out: Path, score: str = "accuracy") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(p.head for p in points):
        mine = [p for p in points if p.head == name]
        x = [p.per_class for p in mine]
        mean, std = np.array([p.mean for p in mine]), np.array([p.std for p in mine])
        ax.plot(x, mean, marker="o", label=name)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("training images per class (last point: all)")
    ax.set_ylabel(f"{score} on {eval_split}")
    ax.set_title("How many labels are enough (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
