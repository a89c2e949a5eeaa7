"""JPEG decoding and preprocessing on the GPU, the fast path of stage one on CUDA.

On CUDA, DataLoader workers only read file bytes (and hash them); the batch of JPEGs is decoded on the
GPU in one `torchvision.io.decode_jpeg` call, resized, cropped and normalised there. Files that are not
plain baseline/progressive RGB or greyscale JPEGs are decoded by PIL in the worker and join the same
GPU resize, so every image goes through one preprocessing recipe.
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.folders import Sample
from pipeline.data.images import ImageError, SampleFiles, decode_image
from pipeline.features.backbones import Preprocessing
from pipeline.features.overlap import prefetched

JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"


def gpu_decodable(data: bytes) -> bool:
    """A whole, upright JPEG (ends with its end-of-image marker, no EXIF rotation), 8-bit Huffman-coded
    (baseline, extended or progressive), greyscale or 3-channel, of nonzero size: nvJPEG decodes it as
    PIL would. Anything else (PNG, CMYK, arithmetic-coded, rotated or truncated files) goes to PIL, which
    also gives bad files their reason. Walks the marker segments up to the first scan: 5 us a file, where
    opening it with PIL cost 25-30 us, as much as its SHA-256 (benchmarks/RESULTS.md)."""
    if not (data.startswith(JPEG_START) and data.rstrip(b"\0").endswith(JPEG_END)):
        return False
    pos, frame = 2, False
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:                                   # fill byte
            pos += 1
            continue
        start, end = pos + 4, pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end > len(data):
            return False
        if marker in (0xC0, 0xC1, 0xC2):                     # start of frame: precision, height, width, channels
            frame = (end - start >= 6 and data[start] == 8 and data[start + 5] in (1, 3)
                     and data[start + 1:start + 3] != b"\0\0" and data[start + 3:start + 5] != b"\0\0")
            if not frame:
                return False
        elif 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):   # lossless, hierarchical, arithmetic
            return False
        elif marker == 0xE1 and data.startswith(b"Exif\0\0", start) and exif_orientation(data[start + 6:end]) != 1:
            return False
        elif marker == 0xDA:                                 # start of scan: the header is over
            return frame
        pos = end
    return False


def exif_orientation(tiff: bytes) -> int:
    """The orientation tag (0x0112) of IFD0 in an EXIF block: 1 (upright) when absent, 0 when the block
    is unreadable (PIL then decides, as on the CPU path)."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 0
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 0
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:
            return int.from_bytes(tiff[entry + 8:entry + 10], order)
    return 1


def chw_tensor(image) -> torch.Tensor:
    """A decoded RGB PIL image as a uint8 [3, H, W] tensor."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


class FileBytes(SampleFiles):
    """Items as `SampleFiles`', with the file's bytes as payload where the GPU can decode them, else the
    image decoded by PIL as a uint8 CHW tensor."""

    def load(self, data: bytes) -> bytes | torch.Tensor:
        return data if gpu_decodable(data) else chw_tensor(decode_image(data))


def collate_bytes(items):
    """(good [(index, sha256)], all JPEG bytes in one uint8 tensor, per good item its (offset, length) or
    None, decoded tensors or None, [(index, reason)]). One tensor per batch crosses from the worker, not one
    per image: handing hundreds of small tensors between processes, and pinning each, costs more than
    decoding them. In a worker the bytes are copied once, straight into shared memory."""
    good = [it for it in items if it[3] is None]
    spans, offset = [], 0
    for it in good:
        jpeg = isinstance(it[1], bytes)
        spans.append((offset, len(it[1])) if jpeg else None)
        offset += len(it[1]) if jpeg else 0
    if torch.utils.data.get_worker_info() is None:
        blob = torch.empty(offset, dtype=torch.uint8)
    else:
        blob = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(offset))
    buffer = blob.numpy()
    for it, span in zip(good, spans):
        if span is not None:
            buffer[span[0]:span[0] + span[1]] = np.frombuffer(it[1], np.uint8)
    decoded_images = [it[1] if span is None else None for it, span in zip(good, spans)]
    return ([(it[0], it[2]) for it in good], blob, spans, decoded_images,
            [(it[0], it[3]) for it in items if it[3] is not None])


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
    in `known` (or None), [(index, reason)]) per batch, as `extract.collate` does. A thread decodes and
    preprocesses the next batches (on CUDA on a stream of its own) while the caller runs the model."""
    from torch.utils.data import DataLoader

    prepare = TensorPreprocess(pre, device)
    loader = DataLoader(FileBytes(root, samples, known), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_bytes, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    return prefetched((decoded(batch, prepare) for batch in loader), device)


def decoded(batch, prepare: TensorPreprocess):
    """One batch from `collate_bytes` to `gpu_batches`'s form: its JPEGs decoded together on the device.
    When nvJPEG refuses the batch (a file whose header passed `gpu_decodable` but whose data it cannot
    read), PIL decodes each of its JPEGs instead and names the bad ones, as on the CPU path."""
    from torchvision.io import ImageReadMode, decode_jpeg

    good, blob, spans, tensors, bad = batch
    images = [None if t is None else t.to(prepare.device, non_blocking=True) for t in tensors]
    jpegs = [k for k, span in enumerate(spans) if span is not None]
    encoded = [blob[spans[k][0]:spans[k][0] + spans[k][1]] for k in jpegs]
    try:
        decoded_jpegs = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=prepare.device) if jpegs else []
    except RuntimeError:
        decoded_jpegs = [pil_decoded(data.numpy().tobytes(), prepare.device) for data in encoded]
    failed = set()
    for k, image in zip(jpegs, decoded_jpegs):
        if isinstance(image, str):
            bad.append((good[k][0], image))
            failed.add(k)
        else:
            images[k] = image
    if failed:
        bad.sort()
        good = [g for k, g in enumerate(good) if k not in failed]
    computed = [image for image in images if image is not None]   # the rest are reused or failed
    return good, (prepare(computed) if computed else None), bad


def pil_decoded(data: bytes, device: torch.device) -> torch.Tensor | str:
    """An image decoded by PIL onto `device`, or the reason it cannot be."""
    try:
        return chw_tensor(decode_image(data)).to(device)
    except ImageError as exc:
        return str(exc)




