"""Throughput of stage one, side by side in one process on the same images, backbone and device:

- tutorial: the loop most tutorials show (DataLoader with 0 workers, float32, a hook whose vectors are
  appended one at a time to a Python list, np.save at the end);
- extract: `pipeline.features.extract.extract`, to a real HDF5 file, as `pipeline extract` runs it; its rate
  is the steady state, from the first batch reaching the model to the closed file, and its start-up (weights
  to the device, workers started, first batch decoded) is reported apart;
- model_only: the forward pass alone on synthetic tensors, same batch size and precision.

extract and model_only run once per engine (on a CPU: torch and ONNX Runtime, and OpenVINO's model alone
when asked for and installed), one result row each. Each is run `repeats` times, interleaved, after one
untimed warm-up (a batch on CUDA, 8 images on CPU); the best run counts (on a shared machine the best is
the least disturbed).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data.folders import Dataset
from pipeline.data.images import ImageFiles, collate
from pipeline.features.backbones.loading import Backbone, load_backbone
from pipeline.features.engines.onnx_runtime import onnx_embedder, resolve_engine
from pipeline.features.engines.openvino import openvino_runner
from pipeline.features.engines.torch import Embedder, FeatureHook
from pipeline.features.extract import extract
from pipeline.features.settings import BenchSettings, ExtractSettings, RunSettings
from pipeline.features.spec import Preprocessing
from pipeline.runtime.devices import default_batch_size, resolve_device, resolve_precision
from pipeline.runtime.files import write_atomically
from pipeline.runtime.settings import fields, validate
from pipeline.storage.cache import library_versions


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def tutorial_transform(pre: Preprocessing):
    """The preprocessing as tutorials write it, with torchvision's transforms."""
    from torchvision import transforms as T
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[pre.interpolation]
    return T.Compose([T.Resize(pre.resize, interpolation=mode), T.CenterCrop(pre.image_size), T.ToTensor(),
                      T.Normalize(pre.mean, pre.std)])


def tutorial_loop(dataset: Dataset, backbone: Backbone, dev: torch.device, batch_size: int,
                  out: Path) -> tuple[int, float]:
    model = backbone.model.to(dev, memory_format=torch.contiguous_format)
    hook = FeatureHook(model, backbone.layer)
    loader = DataLoader(ImageFiles(dataset.root, dataset.samples, tutorial_transform(backbone.preprocessing)),
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
    return len(features), 0.0


def extract_run(dataset: Dataset, backbone: Backbone, out: Path, s: ExtractSettings,
                decoding: dict) -> tuple[int, float]:
    """(images, start-up seconds) of one `extract` run in which every image is computed; its decoders are
    recorded in `decoding[s.engine]`."""
    summary = extract(dataset, backbone, out, replace(s, reuse=False), quiet=True)
    if s.engine not in summary.device:
        raise RuntimeError(f"extract ran {summary.device} instead of {s.engine}: {summary.notes}")
    decoding[s.engine] = summary.decoding
    return summary.extracted, summary.startup_seconds


def model_runner(backbone: Backbone, dev: torch.device, batch_size: int, precision: str, compile: bool,
                 engine: str):
    """fn(batches) running the network extract runs with `engine` over synthetic batches of `batch_size`."""
    size = backbone.preprocessing.image_size
    x = torch.randn(batch_size, 3, size, size, device=dev)
    if engine == "torch":
        embed = Embedder(backbone, dev, precision, compile, batch_size)

        def run(batches: int) -> None:
            for _ in range(batches):
                embed.features(x)
            _sync(dev)
        return run
    embed, notes = onnx_embedder(backbone)     # exports into the cache folder if needed
    if embed is None:
        raise RuntimeError(f"ONNX export unusable: {notes}")
    if engine == "onnxruntime":
        return lambda batches: [embed(x) for _ in range(batches)]
    return openvino_runner(backbone, x.numpy())


def _counted(run, batches: int, batch_size: int) -> tuple[int, float]:
    run(batches)
    return batches * batch_size, 0.0


def _timed(fn) -> tuple[int, float, float]:
    """(images, steady-state seconds, start-up seconds) of `fn`, which returns (images, start-up seconds)."""
    start = time.perf_counter()
    n, startup = fn()
    return n, time.perf_counter() - start - startup, startup


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


def default_engines(dev: torch.device, precision: str, compile: bool) -> list[str]:
    """torch, and ONNX Runtime beside it where `extract` would choose it."""
    return list(dict.fromkeys(["torch", resolve_engine("auto", dev, precision, compile)]))


def bench(data: Path, s: BenchSettings, log=print) -> list[dict]:
    """Time the tutorial loop, and `extract` and the model alone with each engine; return one JSON-ready
    dict per engine (the tutorial loop's figure is the same in each). 'openvino' times the model alone."""
    s = validate(s)
    dev = resolve_device(s.device)
    precision = resolve_precision(s.precision, dev)
    batch_size = s.batch_size or default_batch_size(dev)
    engines = s.engine or default_engines(dev, precision, s.compile)
    for engine in engines:
        if engine != "openvino":
            resolve_engine(engine, dev, precision, s.compile)
    dataset = s.scan(Path(data))
    if s.images:
        dataset = _subset(dataset, s.images)
    bb = load_backbone(s)
    batches = max(1, len(dataset.samples) // batch_size)
    decoding: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jobs = {} if not s.tutorial else {
            "tutorial": lambda d: tutorial_loop(_subset(d, s.tutorial_images), bb, dev, batch_size,
                                                tmp / "tutorial.npy")}
        same = replace(ExtractSettings(**{f.name: getattr(s, f.name) for f in fields(RunSettings)}),
                       batch_size=batch_size, device=str(dev))
        for engine in (e for e in engines if e != "openvino"):
            jobs[f"extract {engine}"] = lambda d, engine=engine: extract_run(
                d, bb, tmp / "features.h5", replace(same, engine=engine), decoding)
        warmup = _subset(dataset, min(len(dataset.samples), batch_size if dev.type == "cuda" else 8))
        for name, job in jobs.items():
            job(warmup)
        for engine in engines:                  # built (and exported) before any timing
            run = model_runner(bb, dev, batch_size, precision, s.compile, engine)
            run(1)
            jobs[f"model_only {engine}"] = lambda d, run=run: _counted(run, batches, batch_size)
        runs: dict[str, list[float]] = {name: [] for name in jobs}
        startups: dict[str, list[float]] = {name: [] for name in jobs}
        for r in range(s.repeats):
            for name, job in jobs.items():
                n, seconds, startup = _timed(lambda: job(dataset))
                runs[name].append(n / seconds)
                startups[name].append(startup)
                log(f"{name:>22} run {r + 1}/{s.repeats}: {n} images in {seconds:.2f}s = {n / seconds:,.1f} "
                    f"images/s" + (f" after {startup:.2f}s of start-up" if startup else ""))
    shared = {"image_size": bb.preprocessing.image_size, "batch_size": batch_size, "device": str(dev),
              "precision": precision, "images": len(dataset.samples)}
    return [_result(s, engine, engines, runs, startups, {**shared, "decoder": decoding.get(engine)})
            for engine in engines]


def _result(s: BenchSettings, engine: str, engines: list[str], runs: dict, startups: dict, run: dict) -> dict:
    """One engine's JSON-ready figures: the best and median rate of each job, start-up, ratios."""
    best = {name: max(rates) for name, rates in runs.items()}
    names = {"tutorial": "tutorial", "extract": f"extract {engine}", "model_only": f"model_only {engine}"}
    mine = {short: name for short, name in names.items() if name in runs}
    ips = {short: best[name] for short, name in mine.items()}
    result = {
        "backbone": s.backbone, "weights": s.weights, "image_size": run["image_size"],
        "batch_size": run["batch_size"], "device": run["device"], "engine": engine, "decoder": run["decoder"],
        "precision": run["precision"], "compile": s.compile, "workers": s.workers, "images": run["images"],
        "repeats": s.repeats,
        "tutorial_images": min(s.tutorial_images, run["images"]) if s.tutorial else 0,
        "images_per_s": ips, "median_images_per_s": {k: statistics.median(runs[n]) for k, n in mine.items()},
        "all_runs_images_per_s": {k: runs[n] for k, n in mine.items()},
        "startup_s": {k: statistics.median(startups[n]) for k, n in mine.items() if any(startups[n])},
        "environment": environment(torch.device(run["device"])),
    }
    ratios = {"model_only_vs_torch": ips["model_only"] / best["model_only torch"]} if "torch" in engines else {}
    if "extract" in ips:
        ratios["extract_vs_model_only"] = ips["extract"] / ips["model_only"]
        if "tutorial" in ips:
            ratios["extract_vs_tutorial"] = ips["extract"] / ips["tutorial"]
    result["ratios"] = ratios
    return result


COLUMNS = ("backbone", "device", "engine", "decoder", "precision", "compile", "batch", "images", "tutorial img/s",
           "extract img/s", "extract start-up s", "model-only img/s", "extract / tutorial", "extract / model-only",
           "model-only / torch")


def table(results: list[dict]) -> str:
    """A markdown table of bench results, one row each (rows from before engines were compared ran torch)."""
    def fmt(x, spec=None, suffix=""):
        return "-" if x is None else format(x, spec or (",.0f" if x >= 100 else ".1f")) + suffix
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        ips, ratios = r["images_per_s"], r["ratios"]
        where = r["environment"].get("gpu", f"{r['device']} ({r['environment']['cpu_count']} cores)")
        rows.append("| " + " | ".join([
            r["backbone"], where, r.get("engine", "torch"), r.get("decoder") or "-", r["precision"],
            "yes" if r["compile"] else "no", str(r["batch_size"]), str(r["images"]), fmt(ips.get("tutorial")),
            fmt(ips.get("extract")), fmt(r.get("startup_s", {}).get("extract"), ".1f"), fmt(ips["model_only"]),
            fmt(ratios.get("extract_vs_tutorial"), ".2f", "x"), fmt(ratios.get("extract_vs_model_only"), ".2f"),
            fmt(ratios.get("model_only_vs_torch"), ".2f", "x")])
            + " |")
    return "\n".join(rows) + "\n"


def write_json(result: dict | list, path: Path) -> None:
    write_atomically(Path(path), json.dumps(result, indent=2) + "\n")
