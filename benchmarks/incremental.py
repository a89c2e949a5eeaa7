"""What incremental extraction saves: a full extraction, then a rerun after adding 1% new images.

    python benchmarks/incremental.py [--images 1000] [--size 256] [--device auto] [--workers N]

Generates JPEG images in a temporary folder (class folders), extracts them with the offline
backbone at its own 224 px, adds 1% new images and extracts again onto the same cache.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.folders import scan
from pipeline.features.backbones.loading import build_backbone
from pipeline.features.settings import ExtractSettings
from pipeline.features.extract import extract


def write_images(root: Path, n: int, size: int, start: int = 0) -> None:
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "features.h5"
        write_images(root, args.images, args.size)
        backbone = build_backbone()
        options = dict(device=args.device, workers=args.workers)
        dataset = scan(root)
        warmup = replace(dataset, samples=dataset.samples[:64])   # first-call costs out of the timing
        extract(warmup, backbone, Path(tmp) / "warmup.h5", ExtractSettings(**options), quiet=True)
        t = time.perf_counter()
        full = extract(dataset, backbone, out, ExtractSettings(**options), quiet=True)
        full_s = time.perf_counter() - t
        added = max(1, args.images // 100)
        write_images(root, added, args.size, start=args.images)
        t = time.perf_counter()
        rerun = extract(scan(root), backbone, out, ExtractSettings(**options), quiet=True)
        rerun_s = time.perf_counter() - t
    print(f"full extraction: {full.computed} images in {full_s:.2f}s on {full.device}")
    print(f"after adding {added}: {rerun.computed} computed, {rerun.reused} reused in {rerun_s:.2f}s "
          f"= {100 * rerun_s / full_s:.1f}% of the full extraction")


if __name__ == "__main__":
    main()
