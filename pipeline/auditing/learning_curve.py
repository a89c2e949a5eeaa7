"""How many labels are enough: accuracy on the evaluation split against training images per class.

For 1, 2, 5, 10, 20, 50, ... images per class (then all of them), each seed draws that many training
images of every class (all of a class that has fewer), fits a cheap head on them and scores it on the
evaluation split; the mean and spread over seeds show whether labelling more is worth it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from pipeline.auditing.label_issues import l2_normalised
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


def _head(name: str, n_rows: int, C: float):
    if name == "knn":
        return KNeighborsClassifier(n_neighbors=min(5, n_rows), weights="distance", metric="cosine")
    return TorchLogReg(C=C, device="cpu")


def learning_curve(X: np.ndarray, y: np.ndarray, X_eval: np.ndarray, y_eval: np.ndarray,
                   heads: tuple[str, ...] = HEADS, seeds: int = 5, C: float = 10.0) -> list[Point]:
    """One Point per head and count; the last count (all images) is one run, the same for every seed."""
    X, X_eval = l2_normalised(np.asarray(X, np.float32)), l2_normalised(np.asarray(X_eval, np.float32))
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    counts = counts_up_to(max(len(rows) for rows in by_class))
    points = []
    for name in heads:
        for n in counts:
            scores = []
            for seed in range(seeds if n < counts[-1] else 1):
                rng = np.random.default_rng(seed)
                rows = np.concatenate([rng.choice(r, min(n, len(r)), replace=False) for r in by_class])
                model = _head(name, len(rows), C).fit(X[rows], y[rows])
                scores.append(float(np.mean(model.predict(X_eval) == y_eval)))
            points.append(Point(name, n, float(np.mean(scores)), float(np.std(scores)), len(scores)))
    return points


def plot(points: list[Point], eval_split: str, out: Path) -> None:
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
    ax.set_ylabel(f"accuracy on {eval_split}")
    ax.set_title("How many labels are enough (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
