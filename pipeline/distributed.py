"""Running the expensive stages on several processes (GPUs, nodes) launched by torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE in each process; with WORLD_SIZE > 1 the commands
join one process group: NCCL on CUDA (one GPU per process, the one LOCAL_RANK names), Gloo on CPU.

Extraction: every split's samples are cut into contiguous blocks balanced by count, one block per
rank (rank r of n gets rows [r*k//n, (r+1)*k//n) of a split of k images). Each rank runs the
ordinary `extract` on its blocks into its own shard `F.rank{r}-of-{n}.h5` next to the output F,
reusing vectors from the previous complete F as a single process would. After a barrier rank 0
concatenates the shards, split by split in rank order, into F through FeatureWriter (so F is
written atomically and is, row for row, the file a single process writes), and deletes them.

Concatenation rather than an HDF5 virtual dataset: a virtual dataset would leave F depending on the
shard files (move or delete one and F breaks), needs the variable-length `paths` strings copied
anyway, and reads slower; copying the rows costs one sequential pass over vectors that are small
next to the images they came from.

Fine-tuning: DistributedDataParallel over a DistributedSampler of the training split (per-process
batch --batch-size, so the global batch is batch_size x world_size). By the linear scaling rule the
learning rate is multiplied by world_size (turn off with --no-scale-lr). Every rank evaluates the
whole val split and rank 0's result is broadcast, so all ranks agree on the best epoch and on
when to stop; rank 0 alone writes checkpoints and the model directory.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import h5py
import torch
import torch.distributed as dist

from pipeline.backbones import load_backbone
from pipeline.data import Dataset, scan, write_manifest
from pipeline.errors import EXIT_CODE_DIR, UserError, check_minimums
from pipeline.extract import MINIMUMS as EXTRACT_MINIMUMS, ExtractSummary, extract, no_training_rows, warn_about
from pipeline.store import FeatureWriter, features_name, output_lock

MERGE_ROWS = 65536   # rows copied at a time when concatenating shards


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    return world_size() > 1


def start(device: str) -> str:
    """Join the process group; return the device this rank uses ('cuda:LOCAL_RANK' or 'cpu')."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return "cpu"


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, args: list[str]) -> int:
    """Run `python -m pipeline ARGS` as `nproc` processes on this machine through torchrun, and return
    the ranks' own exit code (2 for an error, 130 when interrupted) where torchrun's is 1. Each distinct
    error line of the ranks is printed once, in place of torchrun's multi-page failure report."""
    if is_distributed():
        raise UserError("--nproc launches torchrun itself; leave it out when running under torchrun")
    command = [sys.executable, "-m", "pipeline.distributed", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipeline", *args]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, len(os.sched_getaffinity(0)) // nproc))
    with tempfile.TemporaryDirectory() as codes:
        code = subprocess.call(command, env={**os.environ, EXIT_CODE_DIR: codes, "OMP_NUM_THREADS": threads})
        reports = [json.loads(p.read_text()) for p in sorted(Path(codes).iterdir())]
    for message in dict.fromkeys(r["message"] for r in reports if r["message"]):
        print(message, file=sys.stderr)
    ranks = {r["code"] for r in reports}
    return code if code == 0 else 2 if 2 in ranks else 130 if 130 in ranks else code


def quiet_torchrun(argv: list[str]) -> None:
    """torchrun, with its failure report (a traceback and a page per rank) cut to one line for each rank
    that ended without a recorded error of its own (a crash or a signal), and no traceback on Ctrl-C."""
    import logging
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except SignalException:     # the ranks got the signal too and say what they kept
        sys.exit(130)
    except ChildFailedError as exc:
        for failed_rank, failure in sorted(unexplained_failures(exc.failures).items()):
            how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            print(f"error: rank {failed_rank} stopped with {how}", file=sys.stderr)
        sys.exit(1)


def unexplained_failures(failures: dict) -> dict:
    """The failed ranks that said nothing of why: not those that recorded an error (2) or an interrupt
    (130), nor those torchrun itself stopped with SIGTERM because another rank had failed first."""
    first = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM}
    return {r: f for r, f in (first or failures).items() if f.exitcode not in (2, 130)}


def without_option(args: list[str], name: str) -> list[str]:
    """`args` without `name VALUE` or `name=VALUE`."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


# ---- extraction ------------------------------------------------------------------------------

def check_extract_options(options: dict) -> None:
    """What every rank would refuse alike, refused once before launching."""
    check_minimums(EXTRACT_MINIMUMS, options)
    if options.get("compute_stats"):
        raise UserError("--compute-stats needs the whole training split in one process; "
                        "run it without torchrun or --nproc")


@contextmanager
def rank0_lock(out: Path):
    """Rank 0 holds `<out>.lock` for the whole run, as a single process does; when another run holds
    it, every rank stops with rank 0's message instead of waiting for it."""
    with ExitStack() as stack:
        refusal = [None]
        if rank() == 0:
            try:
                stack.enter_context(output_lock(out))
            except UserError as exc:
                refusal = [str(exc)]
        dist.broadcast_object_list(refusal, src=0)
        if refusal[0]:
            raise UserError(refusal[0])
        yield


def shard(dataset: Dataset, r: int, n: int) -> Dataset:
    """Rank r's samples of n: a contiguous block, balanced by count, of every split."""
    samples = []
    for split in dataset.splits():
        rows = dataset.split(split)
        samples += rows[r * len(rows) // n:(r + 1) * len(rows) // n]
    return replace(dataset, samples=samples, skipped=[])


def shard_path(out: Path, r: int, n: int) -> Path:
    return out.with_name(f"{out.stem}.rank{r}-of-{n}{out.suffix}")


def extract_folder(data: Path, out: Path, backbone: str = "efficientnet_lite0", weights: str = "imagenet",
                   layer=None, image_size: int | None = None, val_fraction: float = 0.15,
                   test_fraction: float = 0.15, seed: int = 0, *, labels: Path | None = None,
                   id_column: str = "id", label_column: str | None = None, tta: bool = False,
                   **options) -> ExtractSummary | None:
    """pipeline.extract.extract_folder on every rank of the process group, each on its shard, then
    the shards concatenated into `out` by rank 0. Returns the summary on rank 0, None elsewhere."""
    check_extract_options(options)
    start_time = time.perf_counter()
    device = start(options.pop("device", "auto"))
    try:
        r, n, out = rank(), world_size(), Path(out)
        model = load_backbone(backbone, weights, layer, image_size, tta)   # before any file is written
        with rank0_lock(out):
            dataset = scan(Path(data), val_fraction, test_fraction, seed, labels, id_column, label_column)
            if r == 0:
                out.parent.mkdir(parents=True, exist_ok=True)
                write_manifest(dataset, out.with_suffix(".manifest.csv"))
            quiet = options.pop("quiet", False)
            mine = extract(shard(dataset, r, n), model, shard_path(out, r, n), device=device,
                           quiet=quiet or r > 0, shard_of=out, **options)
            summaries = [None] * n
            dist.all_gather_object(summaries, mine)   # also the barrier: every shard is complete
            if r > 0:
                return None
            skipped = concatenate(dataset, [shard_path(out, i, n) for i in range(n)], out,
                                  extract_seconds=time.perf_counter() - start_time)
            warn_about(out)
            extracted = sum(s.extracted for s in summaries)
            return ExtractSummary(out, extracted + len(skipped), extracted, skipped, time.perf_counter() - start_time,
                                  f"{n} processes, each {mine.device}", sum(s.reused for s in summaries), mine.notes)
    finally:
        stop()


def concatenate(dataset: Dataset, shards: list[Path], out: Path, **attrs) -> list[tuple[str, str]]:
    """Write the shards' rows into `out` split by split in shard order, the files skipped while
    scanning and then those the shards skipped in dataset order (as one process lists them);
    delete the shards (also when this fails). Returns the skipped list."""
    files = [h5py.File(p, "r") for p in shards]
    try:
        order = {s.path: i for i, s in enumerate(s for split in dataset.splits() for s in dataset.split(split))}
        bad = [(p.decode(), reason.decode()) for f in files for p, reason in f["skipped"][:]]
        skipped = [*dataset.skipped, *sorted(bad, key=lambda item: order[item[0]])]
        trained = [f for f in files if "train" in f and f["train"]["labels"].shape[0]]
        if not trained:
            raise UserError(no_training_rows(skipped, out))
        first = files[0]
        layers = json.loads(first.attrs["layers"])
        dims = {layer: trained[0]["train"][features_name(layer, layers)].shape[1] for layer in layers}
        writer = FeatureWriter(out, dict(first.attrs), dims, first.attrs["dtype"])
        try:
            for split in dataset.splits():
                for f in files:
                    if split in f:
                        copy_rows(f[split], split, layers, writer)
            for path, reason in skipped:
                writer.skip(path, reason)
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
    total = group["labels"].shape[0]
    for a in range(0, total, MERGE_ROWS):
        b = min(total, a + MERGE_ROWS)
        writer.append(split, {layer: group[features_name(layer, layers)][a:b] for layer in layers},
                      group["labels"][a:b], list(group["paths"].asstr()[a:b]), group["sha256"][a:b])


# ---- fine-tuning -------------------------------------------------------------------------------

def agree(value):
    """Rank 0's value on every rank (decisions such as the best epoch must not differ)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_totals(row: dict) -> dict:
    """One epoch's training loss, accuracy, images and seconds over all ranks."""
    if not is_distributed():
        return row
    sums = torch.tensor([row["train_loss"] * row["images"], row["train_acc"] * row["images"], row["images"]],
                        dtype=torch.float64)
    dist.all_reduce(sums)
    seconds = torch.tensor([row["train_seconds"]], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    images = max(int(sums[2].item()), 1)
    return {"train_loss": sums[0].item() / images, "train_acc": sums[1].item() / images,
            "images": int(sums[2].item()), "train_seconds": seconds.item()}


def gather_dicts(d: dict) -> dict:
    """The union of every rank's dict (such as the images each rank has seen)."""
    if not is_distributed():
        return d
    parts = [None] * world_size()
    dist.all_gather_object(parts, d)
    return {k: v for part in parts for k, v in part.items()}


if __name__ == "__main__":
    quiet_torchrun(sys.argv[1:])
