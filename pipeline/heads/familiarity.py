"""How unlike the training images a new image is: the mean cosine distance from its vector to the k
nearest training vectors (in the head's preprocessed space, or a fine-tuned network's penultimate features), and the threshold above which it counts as
unfamiliar, set so that a given share of the val images count as familiar (without val, of the training
images, each against the others).

The feature cache already holds what this needs, and the distance separates images of another domain far
better than the head's top probability does: a head is confident on anything far from its boundaries."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

NEIGHBOURS = 10
FILE = "familiarity.npz"  # in a model directory: the reference vectors (an array file: no pickle, no code)
BLOCK = 4096              # query rows compared with the reference per matrix product


def unit_rows(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


def nearest_similarities(queries: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """[len(queries), k] cosine similarities of each query to its k most similar reference rows, most
    similar first; blockwise, so memory stays at BLOCK x len(reference). Both inputs are unit rows."""
    k = min(k, len(reference))
    out = np.empty((len(queries), k), dtype=np.float32)
    ref = reference.T.astype(np.float32)
    for start in range(0, len(queries), BLOCK):
        sims = queries[start:start + BLOCK].astype(np.float32) @ ref
        top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
        out[start:start + BLOCK] = -np.sort(-top, axis=1)
    return out


def mean_distance(similarities: np.ndarray) -> np.ndarray:
    """The mean cosine distance over each row's neighbours: 0 for copies, up to 2 for opposite vectors.
    Neighbours not found are non-finite similarities and left out (NaN for a row without any). The
    audit's isolation of an image (pipeline.auditing.outliers) is this too."""
    found = np.isfinite(similarities)
    with np.errstate(invalid="ignore"):
        return np.where(found, 1 - similarities, 0).sum(1) / found.sum(1)


@dataclass
class Familiarity:
    """The training vectors a new image is compared with (unit rows), and the novelty threshold."""
    reference: np.ndarray
    threshold: float
    quantile: float
    neighbours: int = NEIGHBOURS

    @classmethod
    def fit(cls, train: np.ndarray, val: np.ndarray | None, quantile: float = 0.95,
            neighbours: int = NEIGHBOURS) -> "Familiarity":
        """Reference: the training vectors; threshold: the `quantile` of the val images' novelty, or without
        val, of each training image's novelty among the others (its own vector left out)."""
        reference = unit_rows(train)
        if val is None:
            scores = mean_distance(nearest_similarities(reference, reference, neighbours + 1)[:, 1:])
        else:
            scores = mean_distance(nearest_similarities(unit_rows(val), reference, neighbours))
        return cls(reference.astype(np.float16), float(np.quantile(scores, quantile)), quantile, neighbours)

    def novelty(self, X: np.ndarray) -> np.ndarray:
        return mean_distance(nearest_similarities(unit_rows(X), self.reference, self.neighbours))

    def familiar(self, novelty: np.ndarray) -> np.ndarray:
        return novelty <= self.threshold

    def save(self, folder: Path, space: str = "the head's preprocessed space") -> dict:
        """Write FILE into the model directory `folder`; the keys model.json gains: the threshold and its
        settings, and FILE's SHA-256 under "files". `space`: where the vectors lie, in words."""
        from pipeline.runtime.files import sha256_file
        np.savez(Path(folder) / FILE, reference=self.reference)
        return {"familiarity": {"file": FILE, "threshold": self.threshold, "quantile": self.quantile,
                                "neighbours": self.neighbours,
                                "score": f"mean cosine distance to the nearest training vectors, in {space}"},
                "files": {FILE: sha256_file(Path(folder) / FILE)}}

    @classmethod
    def load(cls, folder: Path, recorded: dict) -> "Familiarity":
        """From a model directory whose files were checked against model.json; `recorded`: its "familiarity"."""
        with np.load(Path(folder) / recorded["file"], allow_pickle=False) as arrays:
            reference = arrays["reference"]
        return cls(reference, float(recorded["threshold"]), float(recorded["quantile"]), int(recorded["neighbours"]))
