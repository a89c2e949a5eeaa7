"""Extraction across torchrun ranks (see pipeline.runtime.distributed): each rank writes a shard,
rank 0 concatenates them."""
from __future__ import annotations

import json
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import h5py
import torch.distributed as dist

from pipeline.data.folders import POOL, Dataset, write_manifest
from pipeline.features.backbones.loading import load_backbone
from pipeline.features.extract import ExtractSummary, extract, manifest_path, no_training_rows, warn_about
from pipeline.features.settings import ExtractSettings
from pipeline.runtime import distributed
from pipeline.runtime.errors import InputError
from pipeline.runtime.files import check_replaceable, output_lock
from pipeline.runtime.settings import validate
from pipeline.storage.cache import FeatureWriter, check_output, features_name, verify_sealed

MERGE_ROWS = 65536   # rows copied at a time when concatenating shards


def check_extract_options(s: ExtractSettings) -> None:
    """What every rank would refuse alike, refused once before launching."""
    validate(s)
    if s.compute_stats:
        raise InputError("--compute-stats needs the whole training split in one process; "
                        "run it without torchrun or --nproc")


@contextmanager
def rank0_lock(out: Path):
    """Rank 0 holds `<out>.lock` for the whole run, as a single process does; when another run holds
    it, every rank stops with rank 0's message instead of waiting for it."""
    with ExitStack() as stack:
        refusal = [None]
        if distributed.rank() == 0:
            try:
                stack.enter_context(output_lock(out))
            except InputError as exc:
                refusal = [str(exc)]
        dist.broadcast_object_list(refusal, src=0)
        if refusal[0]:
            raise InputError(refusal[0])
        yield


def shard(dataset: Dataset, r: int, n: int) -> Dataset:
    """Rank r's samples of n: a contiguous block, balanced by count, of every split."""
    samples = []
    for split in dataset.groups():
        rows = dataset.split(split)
        samples += rows[r * len(rows) // n:(r + 1) * len(rows) // n]
    return replace(dataset, samples=samples, skipped=[])


def shard_path(out: Path, r: int, n: int) -> Path:
    return out.with_name(f"{out.stem}.rank{r}-of-{n}{out.suffix}")


def extract_folder(data: Path, out: Path, s: ExtractSettings, quiet: bool = False,
                   force: bool = False) -> ExtractSummary | None:
    """pipeline.features.extract.extract_folder on every rank of the process group, each on its shard, then
    the shards concatenated into `out` by rank 0. Returns the summary on rank 0, None elsewhere."""
    check_extract_options(s)
    start_time = time.perf_counter()
    device = distributed.start(s.device)
    try:
        r, n, out = distributed.rank(), distributed.world_size(), Path(out)
        check_output(out, force)   # all of this before any file is written
        check_replaceable(manifest_path(out), "manifest")
        dataset = s.scan(Path(data))   # data problems before a download of weights
        model = load_backbone(s)
        with rank0_lock(out):
            mine = extract(shard(dataset, r, n), model, shard_path(out, r, n), replace(s, device=str(device)),
                           quiet or r > 0, shard_of=out)
            summaries = [None] * n
            dist.all_gather_object(summaries, mine)   # also the barrier: every shard is complete
            if r > 0:
                return None
            skipped = concatenate(dataset, [shard_path(out, i, n) for i in range(n)], out,
                                  extract_seconds=time.perf_counter() - start_time)
            write_manifest(dataset, manifest_path(out))
            warn_about(out)
            extracted = sum(summary.extracted for summary in summaries)
            return ExtractSummary(out, extracted + len(skipped), extracted, skipped, time.perf_counter() - start_time,
                                  f"{n} processes, each {mine.device}", sum(summary.reused for summary in summaries),
                                  mine.notes)
    finally:
        distributed.stop()


def concatenate(dataset: Dataset, shards: list[Path], out: Path, **attrs) -> list[tuple[str, str]]:
    """Write the shards' rows into `out` split by split in shard order, the files skipped while
    scanning and then those the shards skipped in dataset order (as one process lists them);
    delete the shards (also when this fails). Returns the skipped list."""
    files = [h5py.File(p, "r") for p in shards]
    try:
        for f, p in zip(files, shards):
            verify_sealed(f, p)
        order = {s.path: i for i, s in enumerate(s for split in dataset.splits() for s in dataset.split(split))}
        bad = [(p.decode(), reason.decode()) for f in files for p, reason in f["skipped"][:]]
        skipped = [*dataset.skipped, *sorted(bad, key=lambda item: order[item[0]])]
        trained = [f for f in files if any(g in f and f[g]["sha256"].shape[0] for g in ("train", POOL))]
        if not trained:
            raise InputError(no_training_rows(skipped, out))
        first = files[0]
        layers = json.loads(first.attrs["layers"])   # a shard this run wrote, opened through open_cache
        dims = {layer: trained[0]["train" if "train" in trained[0] else POOL][features_name(layer, layers)].shape[1] for layer in layers}
        writer = FeatureWriter(out, dict(first.attrs), dims, first.attrs["dtype"])
        try:
            for split in dataset.groups():
                for f in files:
                    if split in f:
                        copy_rows(f[split], split, layers, writer)
            writer.skip(skipped)
            writer.commit(**attrs)
        except BaseException:
            writer.abort()
            raise
    finally:
        for f in files:
            f.close()
        for p in shards:
            p.unlink()
    return writer.skipped


def copy_rows(group: h5py.Group, split: str, layers: list[str], writer: FeatureWriter) -> None:
    total = group["sha256"].shape[0]
    for a in range(0, total, MERGE_ROWS):
        b = min(total, a + MERGE_ROWS)
        writer.append(split, {layer: group[features_name(layer, layers)][a:b] for layer in layers},
                      group["labels"][a:b] if split != POOL else [], list(group["paths"].asstr()[a:b]), group["sha256"][a:b])
