"""Stage one: run the frozen backbone over every image once and stream the features into the cache,
reusing the vectors of unchanged images from the previous cache. On CUDA, JPEGs are decoded and
preprocessed on the GPU (pipeline.features.gpu_decoding); on CPU, PIL decodes them in DataLoader workers."""
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
from typing import Callable, Collection, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.data.folders import Dataset, Sample, write_manifest
from pipeline.data.images import ImageFiles, batches_within, collate, worker_init
from pipeline.features.backbones import Backbone, Embedder, Preprocessing, load_backbone
from pipeline.features.engine import OnnxEmbedder, embedder, resolve_engine
from pipeline.features.gpu_decoding import JpegDecoder, gpu_batches
from pipeline.features.overlap import BackgroundWriter, Block
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


def cpu_batches(root: Path, samples: list[Sample], pre: Preprocessing, batch_size: int, workers: int,
                known: Collection[str] = (), ends: Sequence[int] = ()):
    """PIL decoding in DataLoader workers; yields batches in `collate`'s form, none across one of `ends`
    (`batches_within`). Closing the generator stops the workers at once rather than when it is
    garbage-collected."""
    files = ImageFiles(root, samples, pre.transform(), known, shortest=pre.resize)
    yield from DataLoader(files, batch_sampler=batches_within(len(samples), batch_size, ends),
                          num_workers=workers, collate_fn=collate, worker_init_fn=worker_init())


def channel_stats(dataset: Dataset, backbone: Backbone, batch_size: int = 64, workers: int = 0) -> dict:
    """Per-channel mean and std of the training split's pixels in [0, 1], after resize and crop."""
    samples = dataset.split("train")
    pre = backbone.preprocessing
    loader = DataLoader(ImageFiles(dataset.root, samples, pre.transform(normalise=False), shortest=pre.resize),
                        batch_size=batch_size, num_workers=workers, collate_fn=collate, worker_init_fn=worker_init())
    total, squares, pixels, images = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0, 0
    for _, tensors, _ in loader:
        if tensors is not None:
            x = tensors.to(torch.float64)
            total += x.sum(dim=(0, 2, 3))
            squares += (x * x).sum(dim=(0, 2, 3))
            pixels += x.shape[0] * x.shape[2] * x.shape[3]
            images += x.shape[0]
    if not images:
        raise InputError("--compute-stats: the training split has no readable image")
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp(min=1e-12).sqrt()
    return {"mean": [round(v, 6) for v in mean.tolist()], "std": [round(v, 6) for v in std.tolist()], "images": images}


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
        diffs = differences(old.attrs, {k: attrs[k] for k in FINGERPRINT_FIELDS})
        if diffs:
            old.close()
            return None, f"previous cache not reused, made otherwise: {'; '.join(diffs)}"
        return StoredVectors(old), None
    except InputError as exc:
        old.close()
        return None, f"previous cache not reused: {exc}"


def extract(dataset: Dataset, backbone: Backbone, out: Path, batch_size: int | None = None, device: str = "auto",
            dtype: str = "float16", workers: int | None = None, quiet: bool = False,
            compute_stats: bool = False, reuse: bool = True, precision: str = "auto",
            compile: bool = False, shard_of: Path | None = None, engine: str = "auto") -> ExtractSummary:
    """Write one HDF5 cache with the features of every split of `dataset`.

    When `out` already holds a valid cache with the same fingerprint (and `reuse`), images whose
    bytes are unchanged (same SHA-256) take their vectors from it; only new or changed images run
    through the backbone. Labels, splits and removals follow `dataset`, so relabelled, moved and
    deleted images are handled. The new cache replaces the old one atomically.
    `batch_size` None: `default_batch_size` of the device.
    `precision` is the autocast type of the forward pass (the stored type is `dtype`); `compile`
    runs the model through torch.compile. `engine` runs it through torch or ONNX Runtime
    (pipeline.features.engine; 'auto': ONNX Runtime on a CPU). `shard_of` names the complete cache that `out`
    is a shard of (pipeline.runtime.distributed): vectors are reused from it, and the shard may hold no training rows.
    A cache whose training images were all unusable is refused and not written.

    Progress is checkpointed in `<out>.tmp` as rows are written: a run that was killed or stopped
    with Ctrl-C continues where it stopped when started again with the same data and settings.
    Callers that may run concurrently hold `output_lock(out)` (as `extract_folder` does)."""
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    resolve_engine(engine, dev, precision, compile)      # refused before any file is written
    gpu_decode = dev.type == "cuda"
    workers = default_workers(dev) if workers is None else workers
    batch_size = batch_size or default_batch_size(dev)
    decoder = JpegDecoder(dev) if gpu_decode else None
    start = time.perf_counter()
    startup = None
    stats = None
    if compute_stats:
        stats = channel_stats(dataset, backbone, batch_size, workers)
        backbone = replace(backbone, preprocessing=replace(backbone.preprocessing, mean=tuple(stats["mean"]),
                                                           std=tuple(stats["std"])))
    attrs = dict(cache_attrs(backbone.spec(), dataset.classes, dtype, stats, dataset.root),
                 plan=plan_digest(dataset, batch_size))
    stored, note = previous_vectors(shard_of or out, attrs) if reuse else (None, None)
    known = stored.where if stored else {}
    notes = [*backbone.notes, *([note] if note else [])]
    with closing(stored) if stored else nullcontext():
        try:
            writer = FeatureWriter(out, attrs, backbone.feature_dims, dtype)
        except OSError as exc:
            raise InputError(write_error(exc, out))
        background = BackgroundWriter(writer)
        try:
            extracted = reused = writer.kept
            if writer.progress:
                notes.append(f"resumed an interrupted run: {extracted} images already in {writer.tmp}")
            else:
                writer.skip(list(dataset.skipped))
            pre = backbone.preprocessing
            embed, engine, engine_notes = embedder(backbone, dev, engine, precision, compile, batch_size)
            notes += engine_notes
            decoding = decoder.name if decoder else "PIL"
            mode = (f"{dev}, {engine}, {decoding} decoding, {precision}"
                    f"{', compiled' if compile else ''}, {workers} workers, batches of {batch_size}")
            if not quiet:
                tqdm.write(f"extract: {mode}")
            with embed, \
                    tqdm(total=len(dataset.samples), unit="img", disable=quiet, desc=f"extract {backbone.name}") as bar:
                bar.update(sum(writer.progress.values()))
                # one loader for all splits, its batches cut at their ends: the workers run on from one
                # split into the next instead of starting again
                parts = [(split, dataset.split(split)[writer.progress.get(split, 0):]) for split in dataset.splits()]
                samples = [sample for _, part in parts for sample in part]
                ends = list(itertools.accumulate(len(part) for _, part in parts))
                done = dict(writer.progress)
                batches = (gpu_batches(dataset.root, samples, pre, batch_size, workers, dev, known, decoder, ends)
                           if gpu_decode else cpu_batches(dataset.root, samples, pre, batch_size, workers, known, ends))
                with closing(batches):   # on an error too: its workers and thread stop here
                    for good, images, bad in batches:
                        startup = startup or time.perf_counter() - start
                        split = parts[bisect.bisect_right(ends, (good or bad)[0][0])][0]
                        digests = [digest for _, digest in good]
                        vectors = (_batch_vectors(digests, images, embed, backbone.feature_dims, stored)
                                   if good else None)
                        extracted += len(good)
                        reused += len(good) - (0 if images is None else len(images))
                        done[split] = done.get(split, 0) + len(good) + len(bad)
                        background.append(Block(split, vectors, [samples[i].label for i, _ in good],
                                                [samples[i].path for i, _ in good], digests,
                                                [(samples[i].path, reason) for i, reason in bad], done[split]))
                        bar.update(len(good) + len(bad))
            background.close()
            if not shard_of and not writer.rows("train"):
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
    skipped = writer.skipped
    return ExtractSummary(Path(out), extracted + len(skipped), extracted, skipped,
                          time.perf_counter() - start, mode, reused, notes, startup or 0.0, decoding)


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
    model = load_backbone(s.backbone, s.weights, s.layer, s.image_size, s.tta)
    with output_lock(out):
        summary = extract(dataset, model, out, s.batch_size, s.device, s.dtype, s.workers, quiet, s.compute_stats,
                          s.reuse, s.precision, s.compile, engine=s.engine)
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
