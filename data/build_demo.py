"""Build data/fashion_mnist_demo.npz from Debian's `dataset-fashion-mnist` package.

Run once by a maintainer (`apt-get install dataset-fashion-mnist`, then
`python data/build_demo.py`); the result is committed so users need nothing.
Train and val images come from Fashion-MNIST's training file, test images
from its separate test file, so no image appears in two splits.
"""
import gzip
from pathlib import Path

import numpy as np

SOURCE = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).with_name("fashion_mnist_demo.npz")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
PER_CLASS = {"train": 100, "val": 30, "test": 30}
SEED = 0


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): a header of big-endian dims, then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def pick(labels: np.ndarray, per_class: int, rng: np.random.Generator, skip: int = 0) -> np.ndarray:
    """Indices of `per_class` images of each class, after skipping the first `skip` of the shuffle."""
    chosen = []
    for c in range(len(CLASSES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        chosen.append(idx[skip:skip + per_class])
    return np.concatenate(chosen)


def main() -> None:
    train_x = read_idx(SOURCE / "train-images-idx3-ubyte.gz")
    train_y = read_idx(SOURCE / "train-labels-idx1-ubyte.gz")
    test_x = read_idx(SOURCE / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(SOURCE / "t10k-labels-idx1-ubyte.gz")
    fit_idx = pick(train_y, PER_CLASS["train"] + PER_CLASS["val"], np.random.default_rng(SEED))
    test_idx = pick(test_y, PER_CLASS["test"], np.random.default_rng(SEED))
    images, labels, splits = [], [], []
    for c in range(len(CLASSES)):
        of_class = fit_idx[train_y[fit_idx] == c]
        for split, idx in (("train", of_class[:PER_CLASS["train"]]), ("val", of_class[PER_CLASS["train"]:])):
            images.append(train_x[idx]); labels.append(train_y[idx]); splits += [split] * len(idx)
    images.append(test_x[test_idx]); labels.append(test_y[test_idx]); splits += ["test"] * len(test_idx)
    np.savez_compressed(OUT, images=np.concatenate(images), labels=np.concatenate(labels).astype(np.int64),
                        splits=np.array(splits), classes=np.array(CLASSES))
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB, {len(splits)} images)")


if __name__ == "__main__":
    main()
