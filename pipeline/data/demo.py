"""Turn the embedded demo archive (data/fashion_mnist_demo.npz) into an image folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(archive: Path, out: Path) -> int:
    """Write ROOT/{split}/{class}/{n}.png for every image in the archive; return the count."""
    with np.load(archive) as data:
        images, labels, splits, classes = data["images"], data["labels"], data["splits"], data["classes"]
    if out.exists():
        shutil.rmtree(out)
    for n, (image, label, split) in enumerate(zip(images, labels, splits)):
        folder = out / str(split) / str(classes[label])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{n:05d}.png")
    return len(images)


def write_mosaics(archive: Path, out: Path, count: int, seed: int = 0, classes: int = 10) -> Path:
    """A multi-label image set from the archive: `count` 2x2 mosaics (56 px) of items of the first `classes`
    classes, each showing 1-4 distinct classes (a class may fill several tiles), written as ROOT/<n>.png with
    ROOT/labels.csv (columns id, tags: the classes shown, '|'-separated, in class order); returns its path."""
    rng = np.random.default_rng(seed)
    with np.load(archive) as data:
        images, labels, names = data["images"], data["labels"], data["classes"]
    by_class = [np.flatnonzero(labels == c) for c in range(classes)]
    out.mkdir(parents=True, exist_ok=True)
    rows = ["id,tags"]
    for n in range(count):
        shown = rng.choice(classes, size=rng.integers(1, 5), replace=False)
        tiles = [*shown, *rng.choice(shown, size=4 - len(shown))]
        rng.shuffle(tiles)
        items = [images[rng.choice(by_class[c])] for c in tiles]
        mosaic = np.block([[items[0], items[1]], [items[2], items[3]]])
        Image.fromarray(mosaic).save(out / f"{n:05d}.png")
        rows.append(f"{n:05d},{'|'.join(str(names[c]) for c in sorted(shown))}")
    (out / "labels.csv").write_text("\n".join(rows) + "\n")   # beside the images just made, as they are
    return out / "labels.csv"
