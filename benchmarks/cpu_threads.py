"""How to split a CPU's cores between ONNX Runtime's threads and the decoding workers: `extract` with the
ONNX Runtime engine on the same JPEGs, each split in turn, interleaved over rounds in one process.

    python benchmarks/cpu_threads.py [--data FOLDER] [--images 256] [--rounds 2] [--splits 2:2 2:1 1:1 1:2]

A split THREADS:WORKERS sets OMP_NUM_THREADS (which caps ONNX Runtime's threads) and `--workers`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.make_images import make_images  # noqa: E402
from pipeline.data.folders import Dataset, scan  # noqa: E402
from pipeline.features.backbones.loading import build_backbone  # noqa: E402
from pipeline.features.settings import ExtractSettings
from pipeline.features.extract import extract  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="image folder; default: the one benchmarks/bench.py generates")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--splits", nargs="+", default=["2:2", "2:1", "1:1", "1:2"], help="THREADS:WORKERS")
    args = p.parse_args()
    data = args.data or Path(tempfile.gettempdir()) / f"featurecache-bench-{args.images}"
    if not (data / "train").is_dir():
        make_images(data, args.images, jobs=len(os.sched_getaffinity(0)))
    dataset = scan(data, 0.0, 0.0)
    dataset = Dataset(dataset.root, dataset.classes, dataset.samples[:args.images], dataset.layout)
    backbone = build_backbone()
    print(f"{len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    rates: dict[str, list[float]] = {split: [] for split in args.splits}
    with tempfile.TemporaryDirectory() as tmp:
        warmup = Dataset(dataset.root, dataset.classes, dataset.samples[:8], dataset.layout)
        extract(warmup, backbone, Path(tmp) / "f.h5", ExtractSettings(device="cpu", reuse=False, engine="onnxruntime"),
                quiet=True)
        for r in range(args.rounds):
            for split in args.splits:
                threads, workers = split.split(":")
                os.environ["OMP_NUM_THREADS"] = threads
                start = time.perf_counter()
                s = ExtractSettings(device="cpu", workers=int(workers), reuse=False, engine="onnxruntime")
                summary = extract(dataset, backbone, Path(tmp) / "f.h5", s, quiet=True)
                rate = summary.extracted / (time.perf_counter() - start)
                assert "onnxruntime" in summary.device, summary.notes
                rates[split].append(rate)
                print(f"round {r + 1}: {threads} threads, {workers} workers: {rate:.1f} images/s "
                      f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    print("| threads : workers | " + " | ".join(f"round {r + 1}" for r in range(args.rounds)) + " |")
    print("|---|" + "---:|" * args.rounds)
    for split, values in rates.items():
        print(f"| {split} | " + " | ".join(f"{v:.1f}" for v in values) + " |")


if __name__ == "__main__":
    main()
