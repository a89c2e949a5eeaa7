"""Work off the main thread: batches prepared ahead of the model, HDF5 writes behind it."""
from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.storage.cache import FeatureWriter


def prefetched(batches, device: torch.device, depth: int = 2):
    """Iterate `batches` on a thread, up to `depth` items ahead of the caller, and yield them in order.
    On CUDA the thread queues its work on a stream of its own; each item's tensors (also those in a list)
    are handed to the caller's stream once that work is done. Errors of the thread are raised here."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for item in batches:
                    ready = None
                    if stream is not None:
                        ready = torch.cuda.Event()
                        ready.record(stream)
                    if not hand_over((item, ready, None)):
                        return
        except BaseException as exc:
            hand_over((None, None, exc))
            return
        hand_over((end, None, None))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, ready, error = items.get()
            if error is not None:
                raise error
            if item is end:
                return
            if ready is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(ready)
                for value in item:
                    for tensor in value if isinstance(value, list) else [value]:
                        if isinstance(tensor, torch.Tensor):
                            tensor.record_stream(current)   # its memory is not reused before the caller is done
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass
class Block:
    """One batch of a split on its way to the cache."""
    split: str
    features: Callable[[], dict[str, np.ndarray]] | None   # gives each layer's vectors; None: no rows
    labels: list[int]
    paths: list[str]
    sha256: list[str]
    skipped: list[tuple[str, str]]           # (path, reason) of the batch's files that cannot be used
    done: int                                # samples of `split` done after this batch


class BackgroundWriter:
    """Appends batches to a FeatureWriter from a thread, gathered into slabs of about `slab_bytes`, so HDF5
    writes overlap compute and are never one row at a time. After each slab it records the batches' skipped
    files and checkpoints the writer, so the progress saved in the file never runs ahead of its rows. The
    hand-over queue is bounded: memory stays flat whatever the dataset size."""

    def __init__(self, writer: FeatureWriter, slab_bytes: int = 2 << 20, depth: int = 4):
        self.writer = writer
        self.slab_rows = max(256, slab_bytes // (sum(writer.dims.values()) * writer.dtype.itemsize))
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="hdf5-writer", daemon=True)
        self.thread.start()

    def append(self, block: Block) -> None:
        """Queue one batch; errors of the writing thread surface here."""
        if self.error is not None:
            raise self.error
        self.queue.put(block)

    def _run(self) -> None:
        pending: list = []
        while True:
            item = self.queue.get()
            try:
                if pending and (item is None or item.split != pending[0].split):
                    self._write(pending)
                    pending = []
                if item is not None:
                    pending.append(item)
                    if sum(len(p.labels) for p in pending) >= self.slab_rows:
                        self._write(pending)
                        pending = []
            except BaseException as exc:   # keep draining so the producer never blocks; raised on its side
                self.error, pending = self.error or exc, []
            if item is None:   # the end, also when its last write failed
                return

    def _write(self, blocks: list[Block]) -> None:
        if self.error is not None:
            return
        rows = [b for b in blocks if b.features is not None]
        if rows:
            vectors = [b.features() for b in rows]     # waits for the device where it is still computing
            features = {layer: np.concatenate([v[layer] for v in vectors]) for layer in vectors[0]}
            self.writer.append(blocks[0].split, features, [x for b in rows for x in b.labels],
                               [x for b in rows for x in b.paths], [x for b in rows for x in b.sha256])
        self.writer.skip([s for b in blocks for s in b.skipped])
        self.writer.checkpoint(blocks[-1].split, blocks[-1].done)

    def stop(self) -> None:
        """Write what is pending and wait for the thread (no-op once stopped)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def close(self) -> None:
        """Stop, and raise what the thread met."""
        self.stop()
        if self.error is not None:
            raise self.error
