"""Benchmark stage one: generate the image folder if needed, run `pipeline.features.bench` for each backbone,
write the results as JSON and print one markdown table.

    python benchmarks/bench.py --out benchmarks/cpu.json          (CPU: 256 images in batches of 16, torch and
                                                                  ONNX Runtime side by side; --engine openvino too)
    python benchmarks/bench.py --images 4000 --batch-size 256 --backbone resnet50=none \\
        --backbone resnet18=none --backbone efficientnet_lite0 --out gpu.json [--compile]
    python benchmarks/bench.py --batch-size 16 64 --backbone resnet18=none     (batch sizes side by side)
    python benchmarks/bench.py --table gpu.json gpu-compiled.json      (one table from earlier JSON files)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.make_images import make_images  # noqa: E402
from pipeline.features.bench import bench, table, write_json  # noqa: E402
from pipeline.features.settings import BenchSettings  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="image folder; default: a generated one in the temp folder")
    p.add_argument("--images", type=int, default=256, help="images to generate and time")
    p.add_argument("--backbone", action="append", metavar="NAME[=WEIGHTS]",
                   help="repeatable; WEIGHTS as for `pipeline extract --weights` (default imagenet)")
    p.add_argument("--image-size", type=int, help="crop size; default: each backbone's own")
    p.add_argument("--batch-size", type=int, nargs="+", default=[None],
                   help="images per forward pass, one or several to compare; default: extract's (256 on CUDA, 16 on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", help="auto, float32 or bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile for extract and model-only")
    p.add_argument("--workers", type=int, help="extract's DataLoader workers")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best counts")
    p.add_argument("--no-tutorial", action="store_true", help="skip the tutorial-style loop")
    p.add_argument("--tutorial-images", type=int, default=2048, help="time the tutorial loop on the first N only")
    p.add_argument("--engine", action="append", choices=("torch", "onnxruntime", "openvino"),
                   help="repeatable; default: torch and, on a CPU, onnxruntime (openvino: the model alone)")
    p.add_argument("--out", type=Path, help="JSON file for the list of results")
    p.add_argument("--table", type=Path, nargs="+", help="only print the table of these JSON files")
    args = p.parse_args()
    if args.table:
        results = [r for path in args.table for r in json.loads(path.read_text())]
        print(table(results), end="")
        return
    data = args.data or Path(tempfile.gettempdir()) / f"featurecache-bench-{args.images}"
    if not (data / "train").is_dir():
        print(f"writing {args.images} JPEGs to {data}", file=sys.stderr)
        make_images(data, args.images, jobs=len(os.sched_getaffinity(0)))
    results = []
    for spec in args.backbone or ["efficientnet_lite0"]:
        name, _, weights = spec.partition("=")
        for batch_size in args.batch_size:
            print(f"== {name}, batch size {batch_size or 'default'}", file=sys.stderr)
            s = BenchSettings(backbone=name, weights=weights or "imagenet", image_size=args.image_size,
                              batch_size=batch_size, device=args.device, precision=args.precision,
                              compile=args.compile, workers=args.workers, repeats=args.repeats, images=args.images,
                              tutorial=not args.no_tutorial, tutorial_images=args.tutorial_images,
                              engine=args.engine)
            results += bench(data, s, log=lambda line: print(line, file=sys.stderr))
            if args.out:
                write_json(results, args.out)
    print(table(results), end="")


if __name__ == "__main__":
    main()
