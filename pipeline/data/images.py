"""Reading images: file bytes and their SHA-256, decoding to 8-bit RGB, and the dataset of files that
DataLoader workers read.

Decoding (`read_image`) accepts JPEG, PNG, BMP, GIF (first frame), WebP and TIFF, whatever the case
of the extension, applies the EXIF orientation, and converts every mode to 8-bit RGB: grayscale and
palette are expanded, transparency is composited onto white, CMYK is converted, 16-bit and float
grayscale are scaled from their full range (0-65535, 0-1) to 0-255.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import math
import os
import signal
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Collection, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.data.folders import Sample
from pipeline.runtime.files import read_regular

MAX_ASPECT_RATIO = 200   # beyond this, resizing the short side to the crop size makes a huge image
MAX_FILE_BYTES = 256 << 20   # larger files are skipped unread: no image a model needs is this big


class ImageError(Exception):
    """A file that cannot be used as an image; the message is the recorded reason."""


def image_bytes(path: Path) -> tuple[bytes, str]:
    """The bytes of an image file and their SHA-256 (the key for incremental reuse). Only a regular file
    of at most MAX_FILE_BYTES is read: a FIFO would block and a device like /dev/zero never ends."""
    try:
        data = read_regular(path, MAX_FILE_BYTES)
    except OSError as exc:
        raise ImageError(f"unreadable: {exc.strerror or exc}")
    if not data:
        raise ImageError("empty file")
    return data, hashlib.sha256(data).hexdigest()


class FileItem(NamedTuple):
    """One file as a DataLoader worker hands it over."""
    index: int                 # into the dataset's samples
    payload: Any               # what `load` made of its bytes; None when reused or unusable
    sha256: str | None         # None when unusable
    error: str | None          # why it cannot be used


class SampleFiles:
    """The image files of `samples` under `root`, as a map-style dataset for a DataLoader of FileItems:
    no payload for an image whose sha256 is in `known` (its vector is reused), the reason instead of a
    payload for a file that cannot be used. `load` makes the payload of a file's bytes."""

    def __init__(self, root: Path, samples: list[Sample], known: Collection[str] = ()):
        self.root, self.samples, self.known = root, samples, known

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> FileItem:
        try:
            data, digest = image_bytes(self.root / self.samples[i].path)
            if digest in self.known:
                return FileItem(i, None, digest, None)
            return FileItem(i, self.load(data), digest, None)
        except ImageError as exc:
            return FileItem(i, None, None, str(exc))

    def load(self, data: bytes):
        raise NotImplementedError


def _die_with(parent: int, _worker_id: int) -> None:
    """In a worker: ask Linux to kill it when the process that started it dies (kill -9 too), and go
    at once if that already happened. PyTorch's own check of its parent takes seconds."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):   # not Linux: PyTorch's check remains
        return
    if os.getppid() != parent:
        os._exit(1)


def worker_init() -> functools.partial:
    """A DataLoader `worker_init_fn` whose workers end with the process that creates the loader."""
    return functools.partial(_die_with, os.getpid())


def decode_image(data: bytes, shortest: int | None = None) -> Image.Image:
    """Decode the first frame as 8-bit RGB, upright per its EXIF orientation.

    `shortest`: the short side the caller resizes to. A JPEG at least four times as large is then decoded
    at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) as far as its short side stays at least twice
    `shortest`, so that the caller's antialiased resize still halves it or more: several times faster
    for photos much larger than the model's input, with features within 1% of the full decode's
    (benchmarks/RESULTS.md); nearer scales changed some features by up to 5%.

    Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) stays on and its warning counts as
    an error: an image whose header declares more pixels is rejected before it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                    raise ImageError(f"{width}x{height} pixels: an aspect ratio beyond {MAX_ASPECT_RATIO}:1")
                img.seek(0)
                scale = 2 * shortest / min(width, height) if shortest else 1
                if img.format in ("JPEG", "MPO") and scale <= 0.5:
                    img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
                return to_rgb(ImageOps.exif_transpose(img))
    except UnidentifiedImageError:
        raise ImageError("not a recognised image")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb refused: {exc}".splitlines()[0])
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot decode: {exc}".splitlines()[0])


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        top = 1.0 if img.mode == "F" else 65535.0   # 16-bit files open as I;16 or I
        pixels = np.asarray(img, dtype=np.float64) * (255.0 / top)
        return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def file_under(root: Path, rel: str) -> Path:
    """The file that a cache's relative path names under its data folder; a path that would lead outside it
    (absolute, or with '..') is an ImageError."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise ImageError("path outside the data folder")
    return root.joinpath(*parts)


def read_image(path: Path, shortest: int | None = None) -> tuple[Image.Image, str]:
    """Decode one image as RGB (see `decode_image` for `shortest`); also return the SHA-256 of its bytes."""
    data, digest = image_bytes(path)
    return decode_image(data, shortest), digest


class ImageFiles(SampleFiles):
    """Decodes and preprocesses each image with `transform`; items as `SampleFiles`'. `shortest`: see
    `decode_image` (for resize-then-crop transforms, not random crops)."""

    def __init__(self, root: Path, samples: list[Sample], transform, known: Collection[str] = (),
                 shortest: int | None = None):
        super().__init__(root, samples, known)
        self.transform, self.shortest = transform, shortest

    def load(self, data: bytes) -> torch.Tensor:
        return self.transform(decode_image(data, self.shortest))


def batches_within(n: int, batch_size: int, ends: Sequence[int] = ()) -> list[list[int]]:
    """The indices 0..n-1 in batches of `batch_size` (a DataLoader's `batch_sampler`), cut at each of `ends`
    too, so that no batch holds items from both sides of one."""
    bounds = sorted({0, n, *(e for e in ends if 0 < e < n)})
    return [list(range(i, min(i + batch_size, stop))) for start, stop in zip(bounds, bounds[1:])
            for i in range(start, stop, batch_size)]


def collate(items: list[FileItem]):
    """A batch as (good items [(index, sha256)], stacked tensors of those not reused or None,
    [(index, error)])."""
    computed = [it.payload for it in items if it.payload is not None]
    return ([(it.index, it.sha256) for it in items if it.sha256 is not None],
            torch.stack(computed) if computed else None,
            [(it.index, it.error) for it in items if it.error is not None])
