"""Stage one: run the frozen backbone over every image once and stream the features into the cache."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.backbones import Backbone, FeatureHook, load_backbone
from pipeline.data import Dataset, ImageError, Sample, read_image, scan, write_manifest
from pipeline.fastpath import BackgroundWriter, gpu_batches, pad_batch
from pipeline.store import FeatureWriter, cache_attrs


@dataclass
class ExtractSummary:
    out: Path
    found: int
    extracted: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"

    def lines(self) -> list[str]:
        rate = self.extracted / self.seconds if self.seconds else 0.0
        out = [f"extracted {self.extracted} + skipped {len(self.skipped)} = found {self.found} images "
               f"in {self.seconds:.1f}s ({rate:.0f} images/s on {self.device}) -> {self.out}"]
        out += [f"skipped {path}: {reason}" for path, reason in self.skipped]
        return out


class ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses one sample; a bad file yields its reason instead of a tensor."""

    def __init__(self, root: Path, samples: list[Sample], transform):
        self.root, self.samples, self.transform = root, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            image, digest = read_image(self.root / self.samples[i].path)
            return i, self.transform(image), digest, None
        except ImageError as exc:
            return i, None, None, str(exc)


def collate(items):
    good = [it for it in items if it[1] is not None]
    tensors = torch.stack([it[1] for it in good]) if good else None
    return [it[0] for it in good], tensors, [it[2] for it in good], [(it[0], it[3]) for it in items if it[1] is None]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)))


def resolve_precision(precision: str, dev: torch.device) -> str:
    """'auto': bfloat16 autocast on CUDA; float32 on CPU, where bf16 speed depends on the chip and
    the vectors move more than the speed is worth (benchmarks/RESULTS.md)."""
    if precision == "auto":
        return "bfloat16" if dev.type == "cuda" else "float32"
    return precision


def cpu_batches(root: Path, samples: list[Sample], transform, batch_size: int, workers: int, dev: torch.device):
    """PIL decoding in DataLoader workers; yields (indices, batch on `dev`, sha256s, [(index, reason)])."""
    loader = DataLoader(ImageFiles(root, samples, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate, pin_memory=dev.type == "cuda")
    for idx, images, digests, bad in loader:
        if images is not None:
            images = images.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        yield idx, images, digests, bad


def extract(dataset: Dataset, backbone: Backbone, out: Path, batch_size: int = 64, device: str = "auto",
            dtype: str = "float16", workers: int | None = None, quiet: bool = False,
            precision: str = "auto", compile: bool = False) -> ExtractSummary:
    """Write one HDF5 cache with the features of every split of `dataset`.

    On CUDA the JPEGs are decoded and preprocessed on the GPU (pipeline.fastpath); `precision` is the
    autocast type of the forward pass (the stored type is `dtype`); `compile` runs the model through
    torch.compile (every batch padded to `batch_size` so it compiles once)."""
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    gpu_decode = dev.type == "cuda"
    model = backbone.model.to(dev, memory_format=torch.channels_last)   # faster on CPU and on CUDA
    hook = FeatureHook(model, backbone.layer)
    forward = torch.compile(model) if compile else model
    writer = FeatureWriter(out, cache_attrs(backbone.spec(), dataset.classes, dtype), backbone.feature_dim, dtype)
    for path, reason in dataset.skipped:
        writer.skip(path, reason)
    transform = backbone.preprocessing.transform()
    workers = default_workers() if workers is None else workers
    mode = (f"{dev}, {'GPU' if gpu_decode else 'PIL'} decoding, {precision}"
            f"{', compiled' if compile else ''}, {workers} workers")
    if not quiet:
        tqdm.write(f"extract: {mode}")
    start = time.perf_counter()
    extracted = 0
    background = BackgroundWriter(writer)
    try:
        with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bfloat16"), \
                tqdm(total=len(dataset.samples), unit="img", disable=quiet, desc=f"extract {backbone.name}") as bar:
            for split in dataset.splits():
                samples = dataset.split(split)
                batches = (gpu_batches(dataset.root, samples, backbone.preprocessing, batch_size, workers, dev)
                           if gpu_decode else cpu_batches(dataset.root, samples, transform, batch_size, workers, dev))
                for idx, images, digests, bad in batches:
                    for i, reason in bad:
                        writer.skip(samples[i].path, reason)
                    if images is not None:
                        n = len(idx)
                        forward(pad_batch(images, batch_size) if compile else images)
                        background.append(split, hook.output[:n].float(), [samples[i].label for i in idx],
                                          [samples[i].path for i in idx], digests)
                        extracted += n
                    bar.update(len(idx) + len(bad))
            background.close()
        writer.commit()
    except BaseException:
        background.stop()
        writer.abort()
        raise
    finally:
        hook.remove()
    skipped = writer.skipped
    return ExtractSummary(Path(out), extracted + len(skipped), extracted, skipped,
                          time.perf_counter() - start, mode)


def extract_folder(data: Path, out: Path, backbone: str = "efficientnet_lite0", weights: str = "imagenet",
                   layer: str | None = None, image_size: int | None = None, val_fraction: float = 0.15,
                   test_fraction: float = 0.15, seed: int = 0, **options) -> ExtractSummary:
    """Scan `data`, record the split in `<out>.manifest.csv`, and extract its features into `out`."""
    dataset = scan(Path(data), val_fraction, test_fraction, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(dataset, out.with_suffix(".manifest.csv"))
    return extract(dataset, load_backbone(backbone, weights, layer, image_size), out, **options)
