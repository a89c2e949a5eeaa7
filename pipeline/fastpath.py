"""Fast paths of stage one: JPEG decoding and preprocessing on the GPU, and HDF5 writes off the main thread.

On CUDA, DataLoader workers only read file bytes (and hash them); the batch of JPEGs is decoded on the
GPU in one `torchvision.io.decode_jpeg` call, resized, cropped and normalised there. Files that are not
plain baseline/progressive RGB or greyscale JPEGs are decoded by PIL in the worker and join the same
GPU resize, so every image goes through one preprocessing recipe.
"""
from __future__ import annotations

import io
import queue
import threading
from pathlib import Path
from typing import Collection

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.backbones import Preprocessing
from pipeline.data import ImageError, Sample, decode_image, image_bytes
from pipeline.store import FeatureWriter

JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"


def gpu_decodable(data: bytes) -> bool:
    """A whole, upright JPEG (ends with its end-of-image marker, no EXIF rotation) in RGB or greyscale:
    nvJPEG decodes it as PIL would. Anything else (PNG, CMYK, rotated or truncated files) goes to PIL,
    which also gives bad files their reason."""
    if not (data.startswith(JPEG_START) and data.rstrip(b"\0").endswith(JPEG_END)):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:   # reads the header only
            return img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(0x0112, 1) == 1
    except Exception:
        return False


class FileBytes(torch.utils.data.Dataset):
    """One sample as (index, JPEG bytes or None, decoded uint8 CHW tensor or None, sha256, error); neither
    bytes nor tensor for an image whose sha256 is in `known` (its vector is reused)."""

    def __init__(self, root: Path, samples: list[Sample], known: Collection[str] = ()):
        self.root, self.samples, self.known = root, samples, known

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            data, digest = image_bytes(self.root / self.samples[i].path)
            if digest in self.known:
                return i, None, None, digest, None
            if gpu_decodable(data):
                return i, data, None, digest, None
            image = decode_image(data)
        except ImageError as exc:
            return i, None, None, None, str(exc)
        return i, None, torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(), digest, None


def collate_bytes(items):
    """(good [(index, sha256)], all JPEG bytes in one uint8 tensor, per good item its (offset, length) or
    None, decoded tensors or None, [(index, reason)]). One tensor per batch crosses from the worker, not one
    per image: handing hundreds of small tensors between processes, and pinning each, costs more than
    decoding them."""
    good = [it for it in items if it[4] is None]
    spans, offset = [], 0
    for it in good:
        spans.append(None if it[1] is None else (offset, len(it[1])))
        offset += 0 if it[1] is None else len(it[1])
    joined = bytearray(b"".join(it[1] for it in good if it[1] is not None)) or bytearray(1)   # frombuffer
    blob = torch.frombuffer(joined, dtype=torch.uint8)                                        # needs 1 byte
    return ([(it[0], it[3]) for it in good], blob, spans, [it[2] for it in good],
            [(it[0], it[4]) for it in items if it[4] is not None])


class TensorPreprocess:
    """The recipe of `Preprocessing.transform()` (shorter side to `resize` with antialiasing, centre crop,
    normalise) on uint8 CHW tensors of any size, on whatever device they are; returns a channels-last batch."""

    def __init__(self, pre: Preprocessing, device: torch.device):
        self.pre, self.device = pre, device
        std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) / std

    def resized_crop(self, image: torch.Tensor) -> torch.Tensor:
        """[3, H, W] uint8 -> [3, S, S] float in 0..255, sized as torchvision's Resize(int) + CenterCrop."""
        h, w = image.shape[-2:]
        short, long = min(h, w), max(h, w)
        new_long = int(self.pre.resize * long / short)
        size = (self.pre.resize, new_long) if h <= w else (new_long, self.pre.resize)
        x = F.interpolate(image[None].float(), size, mode=self.pre.interpolation, antialias=True,
                          align_corners=False)
        s = self.pre.image_size
        top, left = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
        return x[0, :, top:top + s, left:left + s]

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        s = self.pre.image_size
        batch = torch.empty((len(images), 3, s, s), device=self.device).contiguous(memory_format=torch.channels_last)
        for k, image in enumerate(images):
            batch[k] = self.resized_crop(image)
        # PIL rounds and clamps to uint8 after resizing; clamping keeps bicubic overshoot in range likewise
        return batch.clamp_(0, 255).mul_(self.scale).add_(self.shift)


def gpu_batches(root: Path, samples: list[Sample], pre: Preprocessing, batch_size: int, workers: int,
                device: torch.device, known: Collection[str] = ()):
    """Yield (good [(index, sha256)], normalised channels-last batch on `device` of the good images not
    in `known` (or None), [(index, reason)]) per batch, as `extract.collate` does."""
    from torch.utils.data import DataLoader
    from torchvision.io import ImageReadMode, decode_jpeg

    prepare = TensorPreprocess(pre, device)
    loader = DataLoader(FileBytes(root, samples, known), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_bytes, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    for good, blob, spans, decoded, bad in loader:
        images = [None if d is None else d.to(device, non_blocking=True) for d in decoded]
        jpegs = [k for k, span in enumerate(spans) if span is not None]
        if jpegs:
            encoded = [blob[spans[k][0]:spans[k][0] + spans[k][1]] for k in jpegs]
            for k, image in zip(jpegs, decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)):
                images[k] = image
        computed = [image for image in images if image is not None]   # the rest are reused
        yield good, (prepare(computed) if computed else None), bad


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

    def append(self, split: str, features: dict[str, np.ndarray] | None, labels, paths, sha256,
               skipped: list[tuple[str, str]], done: int) -> None:
        """One batch of `split`: its rows (`features` maps each layer to its vectors; None when the batch
        has no rows), the files it skipped with their reasons, and the samples of `split` done after it.
        Errors of the writing thread surface here."""
        if self.error is not None:
            raise self.error
        self.queue.put((split, features, list(labels), list(paths), list(sha256), list(skipped), done))

    def _run(self) -> None:
        pending: list = []
        while True:
            item = self.queue.get()
            try:
                if pending and (item is None or item[0] != pending[0][0]):
                    self._write(pending)
                    pending = []
                if item is None:
                    return
                pending.append(item)
                if sum(len(p[2]) for p in pending) >= self.slab_rows:
                    self._write(pending)
                    pending = []
            except BaseException as exc:   # keep draining so the producer never blocks; raised on its side
                self.error, pending = self.error or exc, []

    def _write(self, blocks: list) -> None:
        if self.error is not None:
            return
        rows = [b for b in blocks if b[1] is not None]
        if rows:
            features = {layer: np.concatenate([b[1][layer] for b in rows]) for layer in rows[0][1]}
            self.writer.append(blocks[0][0], features, [x for b in rows for x in b[2]],
                               [x for b in rows for x in b[3]], [x for b in rows for x in b[4]])
        for path, reason in (s for b in blocks for s in b[5]):
            self.writer.skip(path, reason)
        self.writer.checkpoint(blocks[-1][0], blocks[-1][6])

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
