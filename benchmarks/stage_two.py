"""Time stage two on a cache of 60,000 x 1,280 float16 vectors, through the real `pipeline train` protocol:

    python benchmarks/stage_two.py [--classifier torch_logreg=auto,precision=float32 --classifier logreg=1] [--out F]

The vectors are a fixed random ReLU projection of the Fashion-MNIST training images (28x28 -> 1,280),
split 51,000 train / 9,000 val, with its 10,000 test images as test: real class structure at the size
of an EfficientNet-Lite0 cache. `NAME=auto` searches the hyperparameter on val as `pipeline train` does;
`NAME=VALUE` fixes it (one fit plus the refit: the cost of one search candidate, for slow classifiers);
`,KEY=VALUE` pairs after it set the classifier's other params.
"""
from __future__ import annotations

import argparse
import gzip
import json
import lzma
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.heads.train import TrainSettings, train  # noqa: E402
from pipeline.storage.cache import FeatureWriter, cache_attrs  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
DIM = 1280


def read_idx(path: Path) -> np.ndarray:
    """An IDX file, gzip-compressed as Fashion-MNIST ships, or recompressed with xz beside it under the same
    name with .xz (17% smaller: what travels to a GPU machine is limited)."""
    xz = path.with_suffix(".xz")
    with lzma.open(xz) if not path.exists() and xz.exists() else gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_cache(folder: Path, out: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    projection = rng.normal(0, 1 / 28, (784, DIM)).astype(np.float32)
    spec = {"backbone": "random_projection", "weights": "none", "weights_sha256": "none", "layer": "relu",
            "layers": ["relu"], "tta": False, "preprocessing": {"image_size": 28}}
    writer = FeatureWriter(out, cache_attrs(spec, [str(i) for i in range(10)], "float16"), {"relu": DIM}, "float16")
    parts = {"train": ("train", slice(0, 51000)), "val": ("train", slice(51000, 60000)),
             "test": ("t10k", slice(0, 10000))}
    for split, (name, rows) in parts.items():
        images = read_idx(folder / f"{name}-images-idx3-ubyte.gz")[rows].reshape(-1, 784) / 255.0
        labels = read_idx(folder / f"{name}-labels-idx1-ubyte.gz")[rows].astype(np.int64)
        features = np.maximum(images.astype(np.float32) @ projection, 0)
        paths = [f"{name}/{i}" for i in range(len(labels))]
        writer.append(split, {"relu": features}, labels, paths, ["0" * 64] * len(labels))
    writer.commit()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classifier", action="append", metavar="NAME=auto|VALUE[,KEY=VALUE...]",
                   help="repeatable; default: torch_logreg=auto and logreg=auto")
    p.add_argument("--data", type=Path, default=FASHION, help="folder of the Fashion-MNIST IDX .gz files")
    p.add_argument("--out", type=Path, help="JSON file for the results")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_cache(args.data, Path(tmp) / "features.h5")
        for spec in args.classifier or ["torch_logreg=auto", "logreg=auto"]:
            head, *pairs = spec.split(",")
            name, _, value = head.partition("=")
            value = value or "auto"
            params = {k: yaml.safe_load(v) for k, v in (pair.split("=", 1) for pair in pairs)}
            m = train(cache, Path(tmp) / name, TrainSettings(name, value if value == "auto" else float(value), params))
            row = {"classifier": name, "params": params, "search": value == "auto", "candidates": len(m["search"]),
                   "fit_seconds": round(m["fit_seconds"], 2), "top1": round(m["top1"], 4),
                   "chosen": m["hyperparameters"], "n_train": m["n_train"], "n_val": m["n_val"], "n_test": m["n_test"]}
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
