"""`pipeline select`: the pool images of a feature cache to label next, in order, as CSV rows.

picks.csv   path, strategy, score, cluster (path relative to the data folder, as the cache stores it; score
            and cluster empty for random)

The labelled images are those of train and val; test images are never picked but do not steer the picks.
Byte-identical images (the same SHA-256) count as one: a pool image identical to a labelled one, or to an
earlier pool image, is left out. Nothing is written before every pick is made.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.folders import POOL, POOL_FOLDER
from pipeline.runtime.errors import InputError
from pipeline.runtime.files import check_replaceable, write_atomically
from pipeline.runtime.settings import validate
from pipeline.selection.settings import SelectSettings
from pipeline.selection.strategies import choose
from pipeline.storage.cache import open_cache

COLUMNS = ("path", "strategy", "score", "cluster")
STEERING = ("train", "val")   # the labelled splits the strategies learn from


@dataclass
class Candidates:
    """What a cache offers for selection: the labelled vectors and the distinct unlabelled pool images."""
    labelled: np.ndarray
    labels: np.ndarray
    pool: np.ndarray
    paths: list[str]
    classes: int


def candidates(cache_path: Path) -> Candidates:
    with open_cache(cache_path) as cache:
        if not cache.has_pool:
            raise InputError(f"feature cache {cache_path} has no unlabelled pool; put the images to choose from "
                            f"in {POOL_FOLDER}/ beside train/ (or pass --pool with --labels) and run "
                            f"`pipeline extract` again")
        parts = {split: cache.read(split) for split in cache.splits}
        pool = cache.read(POOL)
        classes = len(cache.classes)
    seen = {digest for part in parts.values() for digest in part.sha256}
    keep = []
    for i, digest in enumerate(pool.sha256):
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    steering = [parts[s] for s in STEERING if s in parts]
    width = pool.features.shape[1]
    labelled = np.concatenate([p.features for p in steering]) if steering else np.empty((0, width), np.float32)
    labels = np.concatenate([p.labels for p in steering]) if steering else np.empty(0, np.int64)
    return Candidates(labelled, labels, pool.features[keep], [pool.paths[i] for i in keep], classes)


def select(cache_path: Path, s: SelectSettings | None = None) -> list[dict]:
    """The rows of picks.csv: `s.budget` distinct unlabelled images of the cache's pool, in the order to
    label them."""
    s = validate(s or SelectSettings())
    found = candidates(Path(cache_path))
    if s.budget > len(found.pool):
        raise InputError(f"--budget {s.budget} is more than the {len(found.pool)} distinct unlabelled images of "
                        f"the pool of {cache_path}")
    picks = choose(found.labelled, found.labels, found.pool, found.classes, s)
    return [{"path": found.paths[p.row], "strategy": p.strategy, "score": "" if np.isnan(p.score) else f"{p.score:.6g}",
             "cluster": "" if p.cluster < 0 else p.cluster} for p in picks]


def check_out(out: Path) -> None:
    """Refuse an --out that is a folder or not a regular file, before any work."""
    if Path(out).is_dir():
        raise InputError(f"--out {out} is a folder; name the CSV file, e.g. {Path(out) / 'picks.csv'}")
    check_replaceable(Path(out), "--out")


def write_picks(rows: list[dict], out: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(Path(out), text.getvalue())
