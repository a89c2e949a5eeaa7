"""A second opinion on near-duplicates from the pixels, where the images are at hand.

Heavy re-encoding moves pooled features more than it moves pixels: of copies saved at JPEG quality 50, 40%
reach the feature threshold (0.88), against 93-98% of resized, cropped, mirrored or colour-shifted ones
(benchmarks/RESULTS.md). So a neighbour pair whose similarity is below the threshold but at least
`pixel_check_from` is compared pixel by pixel: each image as a SIDE x SIDE grey thumbnail of the whole
frame, centred and scaled to unit length, correlated with the other straight and mirrored. From
`pixel_match` (0.98) the pair is a near-duplicate: copies correlate above it, while Fashion-MNIST's
look-alike trousers reach 0.95 by the hundred and the two mirror-symmetric halves of one photo 0.97.
The images are read from the data folder the cache records; where they are not reachable, only the
features decide and summary.json says why.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.auditing.neighbours import Pairs
from pipeline.data.images import ImageError, file_under, read_image

SIDE = 32               # thumbnail side: blind to compression noise, still telling scenes apart
MAX_PAIRS = 20_000      # the most similar candidate pairs checked (each image read once, 4 kB kept per image)


def signature(image: Image.Image) -> np.ndarray:
    """[SIDE, SIDE]: the grey thumbnail, centred and of unit length (zero for a flat image, which then
    matches nothing)."""
    grey = np.asarray(image.convert("L").resize((SIDE, SIDE), Image.BOX), np.float32)
    grey -= grey.mean()
    norm = np.linalg.norm(grey)
    return grey / norm if norm > 1e-3 else np.zeros_like(grey)


class PixelCheck:
    """Pixel correlations of pairs of a cache's images, each image read once."""

    def __init__(self, data_root: str | None, paths: np.ndarray):
        self.root = Path(data_root) if data_root else None
        self.paths = paths
        self.signatures: dict[int, np.ndarray | None] = {}
        self.unreadable = 0

    def unavailable(self) -> str | None:
        """Why no pixels can be compared, or None."""
        if self.root is None:
            return "the cache records no data folder"
        if not self.root.is_dir():
            return f"data folder {self.root} not reachable"
        return None

    def _signature(self, row: int) -> np.ndarray | None:
        if row not in self.signatures:
            try:
                image, _ = read_image(file_under(self.root, self.paths[row]), shortest=SIDE)
                self.signatures[row] = signature(image)
            except (ImageError, OSError):
                self.signatures[row] = None
                self.unreadable += 1
        return self.signatures[row]

    def correlation(self, a: int, b: int) -> float:
        """The higher of the straight and mirrored correlation of two images' thumbnails (NaN when one
        cannot be read)."""
        first, second = self._signature(a), self._signature(b)
        if first is None or second is None:
            return float("nan")
        return float(max((first * second).sum(), (first * second[:, ::-1]).sum()))


def confirm(pairs: Pairs, threshold: float, match: float, check: PixelCheck) -> tuple[Pairs, dict]:
    """The pairs at or above `threshold`, and those below it whose pixels correlate at least `match` (the
    MAX_PAIRS most similar of them are checked); and counts of what was checked, for summary.json."""
    below = np.flatnonzero(pairs.similarity < threshold)    # pairs come most similar first
    skipped = check.unavailable() if len(below) else None
    checked = below[:MAX_PAIRS] if skipped is None else below[:0]
    correlations = np.array([check.correlation(pairs.a[i], pairs.b[i]) for i in checked], float)
    confirmed = checked[correlations >= match]
    keep = pairs.similarity >= threshold
    keep[confirmed] = True
    by_pixels = np.zeros(len(keep), bool)
    by_pixels[confirmed] = True
    kept = Pairs(pairs.a, pairs.b, pairs.similarity, by_pixels).subset(keep)
    return kept, {"candidates": len(below), "checked": len(checked), "confirmed": len(confirmed),
                  "unreadable_images": check.unreadable, "skipped": skipped}
