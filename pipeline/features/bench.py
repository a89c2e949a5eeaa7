"""Throughput of stage one, side by side in one process on the same images, backbone and device:

- tutorial: the loop most tutorials show (DataLoader with 0 workers, float32, a hook whose vectors are
  appended one at a time to a Python list, np.save at the end);
- extract: `pipeline.features.extract.extract`, to a real HDF5 file, as `pipeline extract` runs it;
- model_only: the forward pass alone on synthetic tensors, same batch size and precision.

Each is run `repeats` times, interleaved, after one untimed warm-up (a batch on CUDA, 8 images on CPU);
the best run counts (on a shared machine the best is the least disturbed).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data.folders import Dataset, scan
from pipeline.data.images import ImageFiles, collate
from pipeline.features.backbones import Backbone, FeatureHook, inference_model, load_backbone
from pipeline.features.extract import extract
from pipeline.runtime.devices import default_batch_size, resolve_device, resolve_precision
from pipeline.runtime.errors import check_minimums
from pipeline.storage.cache import library_versions


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def tutorial_loop(dataset: Dataset, backbone: Backbone, dev: torch.device, batch_size: int, out: Path) -> int:
    model = backbone.model.to(dev, memory_format=torch.contiguous_format)
    hook = FeatureHook(model, backbone.layer)
    loader = DataLoader(ImageFiles(dataset.root, dataset.samples, backbone.preprocessing.transform()),
                        batch_size=batch_size, num_workers=0, collate_fn=collate)
    features = []
    try:
        with torch.no_grad():
            for _good, images, _bad in loader:
                model(images.to(dev))
                for vector in hook.output:
                    features.append(vector.cpu().numpy())
    finally:
        hook.remove()
    np.save(out, np.stack(features))
    return len(features)


def extract_run(dataset: Dataset, backbone: Backbone, dev: torch.device, batch_size: int, out: Path,
                precision: str, compile: bool, workers: int | None) -> int:
    summary = extract(dataset, backbone, out, batch_size, str(dev), "float16", workers, quiet=True,
                      reuse=False, precision=precision, compile=compile)   # every repeat computes every image
    return summary.extracted


def model_only(backbone: Backbone, dev: torch.device, batch_size: int, precision: str, compile: bool,
               batches: int) -> int:
    model = inference_model(backbone).to(dev, memory_format=torch.channels_last)   # the network extract runs
    forward = torch.compile(model) if compile else model
    size = backbone.preprocessing.image_size
    x = torch.randn(batch_size, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bfloat16"):
        for _ in range(batches):
            forward(x)
        _sync(dev)
    return batches * batch_size


def _timed(fn) -> tuple[int, float]:
    start = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - start


def _subset(dataset: Dataset, n: int) -> Dataset:
    return Dataset(dataset.root, dataset.classes, dataset.samples[:n], dataset.layout)


def environment(dev: torch.device) -> dict:
    env = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": len(os.sched_getaffinity(0)),
           "torch_threads": torch.get_num_threads(), "versions": library_versions()}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
    return env


def bench(data: Path, backbone: str = "efficientnet_lite0", weights: str = "imagenet", image_size: int | None = None,
          batch_size: int | None = None, device: str = "auto", precision: str = "auto", compile: bool = False,
          workers: int | None = None, repeats: int = 2, images: int | None = None,
          skip_tutorial: bool = False, log=print) -> dict:
    """Time the tutorial loop, `extract` and the model alone; return the figures as a JSON-ready dict."""
    check_minimums({"repeats": 1, "images": 1}, {"repeats": repeats, "images": images})
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    batch_size = batch_size or default_batch_size(dev)
    dataset = scan(Path(data), 0.0, 0.0)
    if images:
        dataset = _subset(dataset, images)
    bb = load_backbone(backbone, weights, None, image_size)
    runs: dict[str, list[float]] = {"tutorial": [], "extract": [], "model_only": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jobs = {
            "tutorial": lambda d: tutorial_loop(d, bb, dev, batch_size, tmp / "tutorial.npy"),
            "extract": lambda d: extract_run(d, bb, dev, batch_size, tmp / "features.h5", precision, compile, workers),
            "model_only": lambda d: model_only(bb, dev, batch_size, precision, compile,
                                               max(1, len(d.samples) // batch_size)),
        }
        if skip_tutorial:
            del jobs["tutorial"], runs["tutorial"]
        warmup = _subset(dataset, min(len(dataset.samples), batch_size if dev.type == "cuda" else 8))
        for name, job in jobs.items():
            job(warmup)
        for r in range(repeats):
            for name, job in jobs.items():
                n, seconds = _timed(lambda: job(dataset))
                runs[name].append(n / seconds)
                log(f"{name:>10} run {r + 1}/{repeats}: {n} images in {seconds:.2f}s = {n / seconds:,.1f} images/s")
    best = {name: max(rates) for name, rates in runs.items()}
    result = {
        "backbone": backbone, "weights": weights, "image_size": bb.preprocessing.image_size,
        "batch_size": batch_size, "device": str(dev), "precision": precision, "compile": compile,
        "workers": workers, "images": len(dataset.samples), "repeats": repeats,
        "images_per_s": best, "median_images_per_s": {k: statistics.median(v) for k, v in runs.items()},
        "all_runs_images_per_s": runs, "environment": environment(dev),
    }
    ratios = {"extract_vs_model_only": best["extract"] / best["model_only"]}
    if "tutorial" in best:
        ratios["extract_vs_tutorial"] = best["extract"] / best["tutorial"]
    result["ratios"] = ratios
    return result


COLUMNS = ("backbone", "device", "precision", "compile", "batch", "images", "tutorial img/s", "extract img/s",
           "model-only img/s", "extract / tutorial", "extract / model-only")


def table(results: list[dict]) -> str:
    """A markdown table of bench results, one row each."""
    def fmt(x, spec=None):
        return "-" if x is None else format(x, spec or (",.0f" if x >= 100 else ".1f"))
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        ips, ratios = r["images_per_s"], r["ratios"]
        where = r["environment"].get("gpu", f"{r['device']} ({r['environment']['cpu_count']} cores)")
        rows.append("| " + " | ".join([
            r["backbone"], where, r["precision"], "yes" if r["compile"] else "no", str(r["batch_size"]),
            str(r["images"]), fmt(ips.get("tutorial")), fmt(ips["extract"]), fmt(ips["model_only"]),
            fmt(ratios.get("extract_vs_tutorial"), ".2f") + ("x" if "extract_vs_tutorial" in ratios else ""),
            fmt(ratios["extract_vs_model_only"], ".2f")]) + " |")
    return "\n".join(rows) + "\n"


def write_json(result: dict | list, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
