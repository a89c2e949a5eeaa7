"""How close the CUDA fast path's features are to the CPU path's, on the same images:

    python benchmarks/compare_paths.py DATA [--backbone efficientnet_lite0] [--weights imagenet] [--images 256]

Extracts DATA twice (PIL decoding in float32 on the CPU; GPU decoding on CUDA, in bfloat16 autocast
unless --precision float32) and prints the cosine similarity of matching feature vectors and the
largest difference relative to the norm.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.folders import Dataset, scan  # noqa: E402
from pipeline.features.backbones import load_backbone  # noqa: E402
from pipeline.features.extract import extract  # noqa: E402
from pipeline.storage.cache import open_cache  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="image folder")
    p.add_argument("--backbone", default="efficientnet_lite0", help="registry name")
    p.add_argument("--weights", default="imagenet", help="as for `pipeline extract --weights`")
    p.add_argument("--images", type=int, default=256, help="first N images")
    p.add_argument("--precision", default="bfloat16", help="compute type on CUDA: bfloat16 or float32")
    args = p.parse_args()
    full = scan(args.data, 0.0, 0.0)
    dataset = Dataset(full.root, full.classes, full.samples[:args.images], full.layout)
    features = {}
    with tempfile.TemporaryDirectory() as tmp:
        for device in ("cpu", "cuda"):
            out = Path(tmp) / f"{device}.h5"
            summary = extract(dataset, load_backbone(args.backbone, args.weights), out, 64, device, "float32",
                              quiet=True, precision="float32" if device == "cpu" else args.precision)
            print(summary.lines()[0])
            features[device] = open_cache(out).read("train").features
    a, b = features["cpu"], features["cuda"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    rel = np.abs(a - b).max(1) / np.linalg.norm(a, axis=1)
    print(f"{len(a)} images: cosine similarity min {cos.min():.5f} mean {cos.mean():.5f}; "
          f"max |cpu - cuda| / |cpu| {rel.max():.4f}")


if __name__ == "__main__":
    main()
