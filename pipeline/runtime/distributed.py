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
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.runtime.devices import resolve_device
from pipeline.runtime.errors import EXIT_CODE_DIR, InputError
from pipeline.runtime.printing import say


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    return world_size() > 1


def start(device: str) -> str:
    """Join the process group; return the device this rank uses ('cuda:LOCAL_RANK' or 'cpu')."""
    if resolve_device(device).type == "cuda":
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
        raise InputError("--nproc launches torchrun itself; leave it out when running under torchrun")
    command = [sys.executable, "-m", "pipeline.runtime.distributed", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipeline", *args]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, len(os.sched_getaffinity(0)) // nproc))
    with tempfile.TemporaryDirectory() as codes:
        code = subprocess.call(command, env={**os.environ, EXIT_CODE_DIR: codes, "OMP_NUM_THREADS": threads})
        reports = [json.loads(p.read_text()) for p in sorted(Path(codes).iterdir())]   # the ranks', in our temp dir
    for message in dict.fromkeys(r["message"] for r in reports if r["message"]):
        say(message)
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
            say(f"error: rank {failed_rank} stopped with {how}")
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
