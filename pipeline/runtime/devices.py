"""Which device, precision, batch size and worker count a run uses when the user leaves them to us."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pipeline.runtime.errors import InputError
from pipeline.runtime.settings import setting

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")


def device_setting(on_cuda: str = ""):
    """The `device` field of every stage's settings (and a torch head's `device`); `on_cuda` says what a stage
    does differently there."""
    return setting("auto", f"auto picks CUDA{on_cuda} when present.", choices=DEVICES)
PRECISIONS = ("auto", "float32", "bfloat16")   # autocast type of a forward pass


def resolve_device(device: str) -> torch.device:
    """The one reading of a device setting, for every command: 'auto' is CUDA when torch sees a GPU, else
    the CPU; 'cuda' (or 'cuda:N', as torchrun ranks get) without a GPU, or any other name, is an InputError."""
    import torch  # here, not above: the settings that name devices load without torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise InputError(f"device must be auto, cpu or cuda, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} was asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def default_workers(dev: torch.device) -> int:
    """On CUDA every core this process may use (shared among the processes torchrun started on this machine):
    workers only read and hash files there, and the GPU waits for them. On a CPU at most 8: decoding workers
    share the cores with the model."""
    cores = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return cores if dev.type == "cuda" else min(8, cores)


def default_batch_size(dev: torch.device) -> int:
    """256 on CUDA, to keep the GPU busy; 16 on a CPU, where small batches stay in its caches and run
    faster than large ones (benchmarks/RESULTS.md)."""
    return 256 if dev.type == "cuda" else 16


def resolve_precision(precision: str, dev: torch.device) -> str:
    """'auto': bfloat16 autocast on CUDA; float32 on CPU, where bf16 speed depends on the chip and
    it moves the vectors more than the speed is worth (benchmarks/RESULTS.md)."""
    if precision == "auto":
        return "bfloat16" if dev.type == "cuda" else "float32"
    return precision
