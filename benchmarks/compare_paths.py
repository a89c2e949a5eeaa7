"""How close the CUDA fast path's features are to the CPU path's, on the same images:

    python benchmarks/compare_paths.py DATA [--backbone efficientnet_lite0] [--weights imagenet] [--images 256]
    python benchmarks/compare_paths.py DATA --resize-only [...]

Extracts DATA on the CPU (PIL decoding, torch, float32), then runs the fast path's batches (`gpu_batches`)
on `--device` (cuda) once per decoder, in bfloat16 autocast unless --precision float32, and prints for each
the cosine similarity of matching feature vectors and the largest difference relative to the norm.
`--resize-only` needs no GPU: on the CPU, it compares the CPU path's preprocessing (PIL's resize) with the
fast path's batched resize (`TensorPreprocess`) on the same PIL-decoded pixels, and the backbone's features
of the two.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.folders import Dataset, scan  # noqa: E402
from pipeline.data.images import decode_image  # noqa: E402
from pipeline.features.backbones.loading import build_backbone  # noqa: E402
from pipeline.features.engines.torch import Embedder
from pipeline.features.settings import ExtractSettings
from pipeline.features.extract import extract  # noqa: E402
from pipeline.features.inputs.gpu_decoding import JpegDecoder, TensorPreprocess, chw_tensor, gpu_batches  # noqa: E402
from pipeline.runtime.devices import default_workers  # noqa: E402
from pipeline.storage.cache import open_cache  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="image folder")
    p.add_argument("--backbone", default="efficientnet_lite0", help="registry name")
    p.add_argument("--weights", default="imagenet", help="as for `pipeline extract --weights`")
    p.add_argument("--images", type=int, default=256, help="first N images")
    p.add_argument("--precision", default="bfloat16", help="compute type on CUDA: bfloat16 or float32")
    p.add_argument("--device", default="cuda", help="where the fast path runs (cpu: its code, on CPU tensors)")
    p.add_argument("--resize-only", action="store_true", help="the batched resize against PIL's, on the CPU")
    args = p.parse_args()
    full = scan(args.data, 0.0, 0.0)
    dataset = Dataset(full.root, full.classes, full.samples[:args.images], full.layout)
    backbone = build_backbone(args.backbone, args.weights)
    if args.resize_only:
        return resize_only(dataset, backbone)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cpu.h5"
        s = ExtractSettings(batch_size=64, device="cpu", dtype="float32", precision="float32", engine="torch")
        summary = extract(dataset, backbone, out, s, quiet=True)
        print(summary.lines()[0])
        reference = open_cache(out).read("train").features
    dev = torch.device(args.device)
    embed = Embedder(backbone, dev, args.precision)
    for decoder in JpegDecoder(dev).decoders:          # each GPU decoder alone
        only = JpegDecoder(dev, [decoder])
        batches = gpu_batches(dataset.root, dataset.samples, backbone.preprocessing, 64, default_workers(dev), dev,
                              decoder=only)
        vectors = np.concatenate([embed(x)[backbone.layers[0]] for _, x, _ in batches])
        report(reference, vectors, f"{dev} ({only.name} decoding, {args.precision})")


def report(a: np.ndarray, b: np.ndarray, name: str) -> None:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    rel = np.abs(a - b).max(1) / np.linalg.norm(a, axis=1)
    print(f"{len(a)} images: cosine similarity min {cos.min():.5f} mean {cos.mean():.5f}; "
          f"max |cpu - {name}| / |cpu| {rel.max():.4f}")


def resize_only(dataset: Dataset, backbone) -> None:
    """PIL's resize (the CPU path) against the batched resize, on the CPU, from the same decoded pixels."""
    pre, embed = backbone.preprocessing, Embedder(backbone)
    batched = TensorPreprocess(pre, torch.device("cpu"))
    transform, std = pre.transform(), torch.tensor(pre.std).view(1, 3, 1, 1)
    features, identical, pixels, worst = {"cpu": [], "batched": []}, 0, 0, 0.0
    for start in range(0, len(dataset.samples), 64):
        photos = [decode_image((dataset.root / s.path).read_bytes()) for s in dataset.samples[start:start + 64]]
        a, b = torch.stack([transform(p) for p in photos]), batched([chw_tensor(p) for p in photos])
        grey = ((a - b).abs() * std * 255).round()
        identical, pixels, worst = identical + int((grey == 0).sum()), pixels + grey.numel(), max(worst, grey.max())
        features["cpu"].append(embed(a)[backbone.layers[0]])
        features["batched"].append(embed(b)[backbone.layers[0]])
    print(f"pixels: {identical / pixels:.5%} identical, at most {worst:.0f} grey levels apart")
    report(np.concatenate(features["cpu"]), np.concatenate(features["batched"]), "batched")


if __name__ == "__main__":
    main()
