"""Write a benchmark folder of JPEGs shaped like ordinary photos: ROOT/train/CLASS/*.jpg.

    python benchmarks/make_images.py ROOT --images 2000 [--classes 10] [--seed 0] [--scale 8]

Sizes vary around 500x375 (both orientations), times `--scale` (8: phone photos of about 12 MP); the
content (smooth gradients, noise, shapes) gives JPEG files of realistic size and decoding cost. Seeded: the same arguments give the same files.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def photo_like(rng: np.random.Generator, scale: float = 1) -> Image.Image:
    w, h = int(rng.integers(440, 561) * scale), int(rng.integers(330, 421) * scale)
    if rng.random() < 0.25:
        w, h = h, w
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    gx, gy = rng.uniform(-0.3, 0.3, (2, 3))
    pixels = base + x[..., None] * gx + y[..., None] * gy
    pixels += rng.normal(0, 12, (h, w, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = [x0, y0, x0 + rng.integers(20, w // 2), y0 + rng.integers(20, h // 2)]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return image


def _write(job: tuple) -> None:
    root, i, classes, seed, scale = job
    folder = Path(root) / "train" / f"class_{i % classes:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    photo_like(np.random.default_rng([seed, i]), scale).save(folder / f"{i:06d}.jpg", quality=90)


def make_images(root: Path, images: int, classes: int = 10, seed: int = 0, jobs: int = 1, scale: float = 1) -> Path:
    """Image i depends only on (seed, i) (and `scale`), so any number of processes writes the same folder."""
    work = [(root, i, classes, seed, scale) for i in range(images)]
    if jobs > 1:
        with multiprocessing.Pool(jobs) as pool:
            pool.map(_write, work, chunksize=max(1, min(64, images // jobs)))
    else:
        for job in work:
            _write(job)
    return Path(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to write")
    parser.add_argument("--images", type=int, default=2000, help="number of JPEGs")
    parser.add_argument("--classes", type=int, default=10, help="number of class folders")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="processes")
    parser.add_argument("--scale", type=float, default=1, help="size factor (8: about 4000x3000)")
    args = parser.parse_args()
    make_images(args.root, args.images, args.classes, args.seed, args.jobs, args.scale)


if __name__ == "__main__":
    main()
