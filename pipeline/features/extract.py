"""Stage one: run the frozen backbone over every image once and stream the features into the cache,
reusing the vectors of unchanged images from the previous cache. On CUDA, JPEGs are decoded and
preprocessed on the GPU (pipeline.features.inputs.gpu_decoding); on CPU, PIL decodes them in DataLoader workers."""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.data.folders import POOL, Dataset, Sample, write_manifest
from pipeline.features.backbones.loading import Backbone, load_backbone
from pipeline.features.engines.onnx_runtime import OnnxEmbedder, embedder, resolve_engine
from pipeline.features.engines.torch import Embedder
from pipeline.features.inputs.gpu_decoding import JpegDecoder, gpu_batches
from pipeline.features.inputs.overlap import BackgroundWriter, Block
from pipeline.features.inputs.pil import channel_stats, cpu_batches
from pipeline.features.settings import ExtractSettings
from pipeline.runtime.devices import default_batch_size, default_workers, resolve_device, resolve_precision
from pipeline.runtime.errors import Interrupted, InputError, warn
from pipeline.runtime.files import check_replaceable, output_lock
from pipeline.runtime.settings import validate
from pipeline.storage.cache import (
    FINGERPRINT_FIELDS,
    FeatureWriter,
    StoredVectors,
    cache_attrs,
    check_output,
    content_warnings,
    differences,
    open_cache,
)


@dataclass
class ExtractSummary:
    out: Path
    found: int
    extracted: int                     # rows written: computed by the backbone or reused
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"               # the device and how it ran (decoding, precision, workers)
    reused: int = 0                    # rows copied from the previous cache at `out`
    notes: list[str] = field(default_factory=list)
    startup_seconds: float = 0.0       # until the first batch reached the model: weights, workers, first decode
    decoding: str = "PIL"              # the image decoders, in the order they are tried

    @property
    def computed(self) -> int:
        return self.extracted - self.reused

    def lines(self, show_skipped: int = 20) -> list[str]:
        rate = self.computed / self.seconds if self.seconds else 0.0
        out = [f"extracted {self.extracted} + skipped {len(self.skipped)} = found {self.found} images "
               f"({self.computed} computed, {self.reused} reused) in {self.seconds:.1f}s "
               f"({rate:.0f} images/s on {self.device}) -> {self.out}"]
        out += self.notes
        out += [f"skipped {path}: {reason}" for path, reason in self.skipped[:show_skipped]]
        if len(self.skipped) > show_skipped:
            out.append(f"... and {len(self.skipped) - show_skipped} more skipped, all listed in /skipped of {self.out}")
        return out


def previous_vectors(out: Path, attrs: dict) -> tuple[StoredVectors | None, str | None]:
    """The vectors of the cache already at `out` (left open) when it was made the same way and is whole,
    else a note why not."""
    if not Path(out).exists():
        return None, None
    try:
        old = open_cache(out)
    except InputError as exc:
        return None, f"previous cache not reused: {exc}"
    try:
        diffs = differences(old.attrs, {k: attrs.get(k) for k in FINGERPRINT_FIELDS})
        if diffs:
            old.close()
            return None, f"previous cache not reused, made otherwise: {'; '.join(diffs)}"
        return StoredVectors(old), None
    except InputError as exc:
        old.close()
        return None, f"previous cache not reused: {exc}"


@dataclass
class Plan:
    """How a run computes its vectors, settled before any file is written: the device and what runs on it, the
    batches, where images are decoded, and the cache's attributes."""
    dataset: Dataset
    backbone: Backbone
    settings: ExtractSettings
    device: torch.device
    precision: str
    batch_size: int
    workers: int
    decoder: JpegDecoder | None          # decoding and resizing as tensors (the GPU path); None: PIL in workers
    attrs: dict

    @property
    def decoding(self) -> str:
        return self.decoder.name if self.decoder else "PIL"

    def batches(self, samples: list[Sample], known: Collection[str], ends: list[int]):
        args = (self.dataset.root, samples, self.backbone.preprocessing, self.batch_size, self.workers)
        return (gpu_batches(*args, self.device, known, self.decoder, ends) if self.decoder
                else cpu_batches(*args, known, ends))


def plan(dataset: Dataset, backbone: Backbone, s: ExtractSettings) -> Plan:
    """The run `s` asks for; unusable settings (an engine the device cannot run) are refused here. The cache's
    attributes record what changes a vector: the backbone, the stored type, and how it was computed (the
    precision of the forward pass, and whether images went through PIL or the tensor path)."""
    dev = resolve_device(s.device)
    precision = resolve_precision(s.precision, dev)
    resolve_engine(s.engine, dev, precision, s.compile)
    workers = default_workers(dev) if s.workers is None else s.workers
    batch_size = s.batch_size or default_batch_size(dev)
    tensors = s.decoding == "tensor" or (s.decoding == "auto" and dev.type == "cuda")
    decoder = JpegDecoder(dev) if tensors else None
    stats = None
    if s.compute_stats:
        stats = channel_stats(dataset, backbone, batch_size, workers)
        backbone = replace(backbone, preprocessing=replace(backbone.preprocessing, mean=tuple(stats["mean"]),
                                                           std=tuple(stats["std"])))
    compute = {"precision": precision, "inputs": "tensor" if tensors else "PIL"}
    attrs = dict(cache_attrs(backbone.spec(), dataset.classes, s.dtype, stats, dataset.root, compute,
                             dataset.multi_label),
                 plan=plan_digest(dataset, batch_size))
    return Plan(dataset, backbone, s, dev, precision, batch_size, workers, decoder, attrs)


def extract(dataset: Dataset, backbone: Backbone, out: Path, s: ExtractSettings, quiet: bool = False,
            shard_of: Path | None = None) -> ExtractSummary:
    """Write one HDF5 cache with the features of every split of `dataset`, run as `s` says (`plan`).

    When `out` already holds a valid cache with the same fingerprint (and `s.reuse`), images whose
    bytes are unchanged (same SHA-256) take their vectors from it; only new or changed images run
    through the backbone. Labels, splits and removals follow `dataset`, so relabelled, moved and
    deleted images are handled. The new cache replaces the old one atomically.
    `shard_of` names the complete cache that `out` is a shard of (pipeline.runtime.distributed): vectors are
    reused from it, and the shard may hold no training rows.
    A cache whose training images were all unusable is refused and not written, unless it has a pool.

    Progress is checkpointed in `<out>.tmp` as rows are written: a run that was killed or stopped
    with Ctrl-C continues where it stopped when started again with the same data and settings.
    Callers that may run concurrently hold `output_lock(out)` (as `extract_folder` does)."""
    start = time.perf_counter()
    run = plan(dataset, backbone, s)
    stored, note = previous_vectors(shard_of or out, run.attrs) if s.reuse else (None, None)
    with closing(stored) if stored else nullcontext():
        try:
            writer = FeatureWriter(out, run.attrs, run.backbone.feature_dims, s.dtype)
        except OSError as exc:
            raise InputError(write_error(exc, out))
        summary = ExtractSummary(Path(out), 0, writer.kept, reused=writer.kept, decoding=run.decoding,
                                 notes=[*backbone.notes, *([note] if note else [])])
        background = BackgroundWriter(writer)
        try:
            _run(run, writer, background, stored, summary, quiet, start)
            if not shard_of and not writer.rows("train") and not writer.rows(POOL):
                raise InputError(no_training_rows(writer.skipped, out))
            writer.commit(extract_seconds=time.perf_counter() - start)
        except KeyboardInterrupt:
            background.stop()
            writer.close()
            raise Interrupted(f"interrupted: {writer.kept} images are kept in {writer.tmp}; "
                              f"run the same command again to continue from there")
        except OSError as exc:
            background.stop()
            writer.abort()
            raise InputError(write_error(exc, out))
        except BaseException:
            background.stop()
            writer.abort()
            raise
    summary.skipped = writer.skipped
    summary.found = summary.extracted + len(summary.skipped)
    summary.seconds = time.perf_counter() - start
    return summary


def _run(run: Plan, writer: FeatureWriter, background: BackgroundWriter, stored: StoredVectors | None,
         summary: ExtractSummary, quiet: bool, start: float) -> None:
    """The loop: batches of images (those not written by an interrupted run) through the backbone, vectors of
    known images from `stored`, each batch's rows to the background writer; `summary` counts as it goes."""
    dataset, backbone, s = run.dataset, run.backbone, run.settings
    if writer.progress:
        summary.notes.append(f"resumed an interrupted run: {writer.kept} images already in {writer.tmp}")
    else:
        writer.skip(list(dataset.skipped))
    embed, engine, engine_notes = embedder(backbone, run.device, s.engine, run.precision, s.compile, run.batch_size)
    summary.notes += engine_notes
    summary.device = (f"{run.device}, {engine}, {run.decoding} decoding, {run.precision}"
                      f"{', compiled' if s.compile else ''}, {run.workers} workers, batches of {run.batch_size}")
    if not quiet:
        tqdm.write(f"extract: {summary.device}")
    known = stored.where if stored else {}
    with embed, tqdm(total=len(dataset.samples), unit="img", disable=quiet, desc=f"extract {backbone.name}") as bar:
        bar.update(sum(writer.progress.values()))
        # one loader for all splits, its batches cut at their ends: the workers run on from one
        # split into the next instead of starting again
        parts = [(split, dataset.split(split)[writer.progress.get(split, 0):]) for split in dataset.groups()]
        samples = [sample for _, part in parts for sample in part]
        ends = list(itertools.accumulate(len(part) for _, part in parts))
        done = dict(writer.progress)
        with closing(run.batches(samples, known, ends)) as batches:   # on an error too: its workers stop here
            for good, images, bad in batches:
                summary.startup_seconds = summary.startup_seconds or time.perf_counter() - start
                split = parts[bisect.bisect_right(ends, (good or bad)[0][0])][0]
                digests = [digest for _, digest in good]
                vectors = _batch_vectors(digests, images, embed, backbone.feature_dims, stored) if good else None
                summary.extracted += len(good)
                summary.reused += len(good) - (0 if images is None else len(images))
                done[split] = done.get(split, 0) + len(good) + len(bad)
                background.append(Block(split, vectors, [samples[i].label for i, _ in good],
                                        [samples[i].path for i, _ in good], digests,
                                        [(samples[i].path, reason) for i, reason in bad], done[split]))
                bar.update(len(good) + len(bad))
    background.close()


def write_error(exc: OSError, out: Path) -> str:
    reason = os.strerror(exc.errno) if exc.errno else str(exc).splitlines()[0]
    return f"cannot write {out}.tmp: {reason}; {out} is left as it was"


def no_training_rows(skipped: list[tuple[str, str]], out: Path) -> str:
    example = f", e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
    return (f"no training image could be used ({len(skipped)} files skipped{example}); "
            f"{out} is left as it was")


def plan_digest(dataset: Dataset, batch_size: int) -> str:
    """Digest of what a run will write, in order: an interrupted run continues only the same plan
    (the batch size too, so batches, and hence vectors, are cut exactly as in one go)."""
    plan = [dataset.classes, [(s.split, s.path, s.label) for s in dataset.samples], dataset.skipped, batch_size]
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()


def _batch_vectors(digests: list[str], images: torch.Tensor | None, embed: Embedder | OnnxEmbedder,
                   dims: dict[str, int], stored: StoredVectors | None) -> Callable[[], dict[str, np.ndarray]]:
    """A function giving each layer's vectors for a batch, in order: known digests from `stored`, the rest
    computed. The forward pass is queued now; the writer thread calls the function, so the main thread goes
    on to the next batch without waiting for this one's vectors."""
    computed = embed.submit(images) if images is not None else (lambda: {})
    known = np.array([stored is not None and d in stored.where for d in digests])
    old = stored.read([d for d, k in zip(digests, known) if k]) if known.any() else {}

    def vectors() -> dict[str, np.ndarray]:
        new, out = computed(), {}
        if not old or not new:     # all computed or all reused: no copy
            return new or old
        for layer, dim in dims.items():
            out[layer] = np.empty((len(digests), dim), np.float32)
            out[layer][~known] = new[layer]
            out[layer][known] = old[layer]
        return out
    return vectors


def extract_folder(data: Path, out: Path, s: ExtractSettings, quiet: bool = False,
                   force: bool = False) -> ExtractSummary:
    """Scan `data` (or the images `s.labels` names), extract its features into `out` and record the split
    in `<out>.manifest.csv`. A second run on the same `out` is refused at once while this one holds
    `<out>.lock`. Bad settings, data and outputs (`check_output`; `force` replaces a file that is not a
    feature cache) are refused before any file is written."""
    s = validate(s)
    dev = resolve_device(s.device)
    resolve_engine(s.engine, dev, resolve_precision(s.precision, dev), s.compile)
    out = Path(out)
    check_output(out, force)
    check_replaceable(manifest_path(out), "manifest")
    dataset = s.scan(Path(data))   # data problems before a download of weights
    model = load_backbone(s)
    with output_lock(out):
        summary = extract(dataset, model, out, s, quiet)
        write_manifest(dataset, manifest_path(out))
    warn_about(out)
    return summary


def manifest_path(out: Path) -> Path:
    return Path(out).with_suffix(".manifest.csv")


def warn_about(cache: Path) -> None:
    """One `warning:` line per class missing from a split and per image found in two splits."""
    with open_cache(cache) as written:
        for line in content_warnings(written):
            warn(line)
