"""The CPU input path: PIL decodes, resizes and crops each image in DataLoader workers."""
from __future__ import annotations

from pathlib import Path
from typing import Collection, Sequence

import torch
from torch.utils.data import DataLoader

from pipeline.data.folders import Dataset, Sample
from pipeline.data.images import ImageFiles, batches_within, collate, worker_init
from pipeline.features.spec import Preprocessing
from pipeline.runtime.errors import InputError

def cpu_batches(root: Path, samples: list[Sample], pre: Preprocessing, batch_size: int, workers: int,
                known: Collection[str] = (), ends: Sequence[int] = ()):
    """PIL decoding in DataLoader workers; yields batches in `collate`'s form, none across one of `ends`
    (`batches_within`). Closing the generator stops the workers at once rather than when it is
    garbage-collected."""
    files = ImageFiles(root, samples, pre.transform(), known, shortest=pre.resize)
    yield from DataLoader(files, batch_sampler=batches_within(len(samples), batch_size, ends),
                          num_workers=workers, collate_fn=collate, worker_init_fn=worker_init())


def channel_stats(dataset: Dataset, backbone, batch_size: int = 64, workers: int = 0) -> dict:
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
