"""A second opinion on near-duplicates from the pixels, where the images are at hand.

Heavy re-encoding and crops move pooled features more than they move pixels: at the feature threshold
(0.90) 48% of copies saved at JPEG quality 50 and 40-55% of copies cropped from a corner (also re-encoded or
rescaled) are found, against 85-98% of resized, centrally cropped, mirrored or colour-shifted ones
(benchmarks/RESULTS.md). So a neighbour pair whose
similarity is below the threshold but at least `pixel_check_from` is compared pixel by pixel. Each image is
kept as a THUMB x THUMB grey thumbnail of its whole frame. A crop shifts and stretches the content, so the
comparison first aligns: for each way round (which image is the cut-out) and with the second image straight
or mirrored, the span of the first that matches the second best is searched on the row and column profiles
(cuts of 0-12% from each side, in steps of 1%), then that span and the other whole frame are correlated as
SIDE x SIDE thumbnails, centred and of unit length. From `pixel_match` (0.992) the pair is a near-duplicate:
cropped, rescaled and re-encoded copies correlate above it, while look-alikes stay under it (handwritten 1s
and Fashion-MNIST trousers reach 0.97-0.99 by the dozen once aligned, so the match is chosen on the
benchmark with them). The images are read from the data folder the cache records; where they are not
reachable, only the features decide and summary.json says why.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.auditing.neighbours import Pairs
from pipeline.data.images import ImageError, file_under, read_image

THUMB = 48              # stored grey thumbnail side (2.3 kB per image, uint8)
SIDE = 32               # side at which aligned thumbnails are correlated: blind to compression noise
MAX_CROP = 0.12         # the largest share cut from one side, or two opposite sides together, undone
CROPS = np.linspace(0, MAX_CROP, 13)  # cut tried on each side (step 1%)
MAX_PAIRS = 20_000      # the most similar candidate pairs checked (each image read once)


def thumbnail(image: Image.Image) -> np.ndarray:
    """[THUMB, THUMB] uint8: the grey thumbnail of the whole frame."""
    return np.asarray(image.convert("L").resize((THUMB, THUMB), Image.BOX), np.uint8)


def _resampling(cut_low: float, cut_high: float) -> np.ndarray:
    """[SIDE, THUMB]: each of SIDE output pixels the mean of the stretch of a THUMB line it covers, over the
    span [cut_low, 1 - cut_high] of the line (area resampling, as PIL's BOX filter)."""
    edges = (cut_low + (1 - cut_low - cut_high) * np.arange(SIDE + 1) / SIDE) * THUMB
    start, stop = edges[:-1, None], edges[1:, None]
    pixel = np.arange(THUMB)[None, :]
    overlap = np.clip(np.minimum(stop, pixel + 1) - np.maximum(start, pixel), 0, None)
    return (overlap / overlap.sum(1, keepdims=True)).astype(np.float32)


SPANS = [(low, high) for low in CROPS for high in CROPS if low + high <= MAX_CROP + 1e-9]   # 91 spans
SPAN_MATRICES = np.stack([_resampling(low, high) for low, high in SPANS])   # [S, SIDE, THUMB]


def _unit(x: np.ndarray) -> np.ndarray:
    """Centred and of unit length along the last axis (zero where flat, which then matches nothing)."""
    x = x - x.mean(-1, keepdims=True)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norm > 1e-3, x / np.maximum(norm, 1e-3), 0)


def _best_span(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """[P] index into SPANS of the span of each `part` profile [P, THUMB] that best matches the whole
    `whole` profile [P, THUMB]."""
    spans = _unit((part @ SPAN_MATRICES.reshape(-1, THUMB).T).reshape(len(part), len(SPANS), SIDE))
    target = _unit(whole @ SPAN_MATRICES[0].T)
    return (spans @ target[:, :, None])[:, :, 0].argmax(1)


def _cut_out(first: np.ndarray, other: np.ndarray) -> np.ndarray:
    """[P, SIDE, SIDE]: the span of each `first` thumbnail that matches `other` best. The column span is
    found on the column profiles (means over rows), the row span on the row profiles over that column
    span, then the column span again over that row span."""
    cols = SPAN_MATRICES[_best_span(first.mean(1), other.mean(1))]
    for _ in range(2):
        rows = SPAN_MATRICES[_best_span((first @ cols.transpose(0, 2, 1)).mean(2), other.mean(2))]
        cols = SPAN_MATRICES[_best_span((rows @ first).mean(1), other.mean(1))]
    return rows @ first @ cols.transpose(0, 2, 1)


def aligned_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[P]: how well the thumbnails `b` [P, THUMB, THUMB] match `a` (same shape), allowing either to be cut
    by up to MAX_CROP from each side (then rescaled) and `b` to be mirrored: the highest correlation, over
    both ways round and mirroring, of the best cut-out (`_cut_out`) with the other whole frame at
    SIDE x SIDE."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    whole = SPAN_MATRICES[0]
    best = np.full(len(a), -1.0, np.float32)
    for first, second in ((a, b), (b, a)):
        for other in (second, second[:, :, ::-1]):
            cut = _cut_out(first, other).reshape(len(a), -1)
            full = (whole @ other @ whole.T).reshape(len(a), -1)
            best = np.maximum(best, (_unit(cut) * _unit(full)).sum(1))
    return best


class PixelCheck:
    """Aligned pixel correlations of pairs of a cache's images, each image read once."""

    def __init__(self, data_root: str | None, paths: np.ndarray):
        self.root = Path(data_root) if data_root else None
        self.paths = paths
        self.thumbnails: dict[int, np.ndarray | None] = {}
        self.known: dict[tuple[int, int], float] = {}   # correlations of the pairs compared so far
        self.unreadable = 0

    def unavailable(self) -> str | None:
        """Why no pixels can be compared, or None."""
        if self.root is None:
            return "the cache records no data folder"
        if not self.root.is_dir():
            return f"data folder {self.root} not reachable"
        return None

    def _thumbnail(self, row: int) -> np.ndarray | None:
        if row not in self.thumbnails:
            try:
                image, _ = read_image(file_under(self.root, self.paths[row]), shortest=THUMB)
                self.thumbnails[row] = thumbnail(image)
            except (ImageError, OSError):
                self.thumbnails[row] = None
                self.unreadable += 1
        return self.thumbnails[row]

    def correlations(self, a: np.ndarray, b: np.ndarray, batch: int = 1024) -> np.ndarray:
        """[P] aligned_correlation of the images of rows a[i] and b[i] (NaN where one cannot be read), each
        pair computed once."""
        new = [(i, j) for i, j in dict.fromkeys(zip(a.tolist(), b.tolist())) if (i, j) not in self.known]
        readable = [(i, j) for i, j in new if self._thumbnail(i) is not None and self._thumbnail(j) is not None]
        self.known.update(dict.fromkeys(new, np.nan))
        for start in range(0, len(readable), batch):
            chunk = readable[start:start + batch]
            values = aligned_correlation(np.stack([self.thumbnails[i] for i, _ in chunk]),
                                         np.stack([self.thumbnails[j] for _, j in chunk]))
            self.known.update(zip(chunk, values.tolist()))
        return np.array([self.known[pair] for pair in zip(a.tolist(), b.tolist())], float)


def confirm(pairs: Pairs, threshold: float, match: float, check: PixelCheck) -> tuple[Pairs, dict]:
    """The pairs at or above `threshold`, and those below it whose pixels correlate at least `match` (the
    MAX_PAIRS most similar of them are checked); and counts of what was checked, for summary.json."""
    below = np.flatnonzero(pairs.similarity < threshold)    # pairs come most similar first
    skipped = check.unavailable() if len(below) else None
    checked = below[:MAX_PAIRS] if skipped is None else below[:0]
    correlation = np.full(len(pairs.a), np.nan)
    correlation[checked] = check.correlations(pairs.a[checked], pairs.b[checked])
    with np.errstate(invalid="ignore"):
        by_pixels = correlation >= match
    keep = (pairs.similarity >= threshold) | by_pixels
    kept = Pairs(pairs.a, pairs.b, pairs.similarity, by_pixels, correlation).subset(keep)
    return kept, {"candidates": len(below), "checked": len(checked), "confirmed": int(by_pixels.sum()),
                  "unreadable_images": check.unreadable, "skipped": skipped}
