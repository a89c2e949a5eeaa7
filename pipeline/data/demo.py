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
