"""Write the Fashion-MNIST IDX files as an image folder, ROOT/{train,val,test}/CLASS/N.png: its 60,000
training images cut into 54,000 train and 6,000 val (seeded, stratified by taking every tenth image of a
class), its 10,000 test images as test. `--per-class` keeps the first N of each class and split (smoke runs).

    python benchmarks/fashion_folder.py ROOT [--data /usr/share/datasets/fashion-mnist] [--per-class N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stage_two import FASHION, read_idx  # noqa: E402

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def write_folder(root: Path, data: Path = FASHION, per_class: int | None = None) -> int:
    written = 0
    for name, splits in (("train", ("train", "val")), ("t10k", ("test",))):
        images = read_idx(data / f"{name}-images-idx3-ubyte.gz")
        labels = read_idx(data / f"{name}-labels-idx1-ubyte.gz")
        seen: dict[tuple[str, int], int] = {}
        for n, (image, label) in enumerate(zip(images, labels)):
            split = splits[-1] if len(splits) == 1 or n % 10 == 9 else splits[0]
            count = seen.get((split, label), 0)
            if per_class is not None and count >= per_class:
                continue
            seen[(split, label)] = count + 1
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{name}-{n:05d}.png")
            written += 1
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="folder to write")
    p.add_argument("--data", type=Path, default=FASHION, help="folder of the Fashion-MNIST IDX .gz files")
    p.add_argument("--per-class", type=int, default=None, help="at most N images of each class and split")
    args = p.parse_args()
    print(f"{write_folder(args.root, args.data, args.per_class)} images -> {args.root}")


if __name__ == "__main__":
    main()
