"""JPEG decoding and preprocessing on the GPU, the fast path of stage one on CUDA.

On CUDA, DataLoader workers only read file bytes (and hash them); each batch of JPEGs is decoded on the
GPU in one call, then resized, cropped and normalised there, images of one size together. Decoders, in
order, each taking only the images the one before could not decode: NVIDIA nvImageCodec (the optional
`[gpu]` extra: nvJPEG, with the hardware JPEG engines of A100/H100-class GPUs, and a CPU thread pool of
its own), torchvision's `decode_jpeg`, PIL. Files that are not plain baseline/progressive RGB or
greyscale JPEGs are decoded by PIL in the worker and join the same resize, so every image goes through
one preprocessing recipe.
"""
from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from pathlib import Path
from typing import Collection

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.folders import Sample
from pipeline.data.images import FileItem, ImageError, SampleFiles, decode_image, worker_init
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


def collate_bytes(items: list[FileItem]):
    """(good [(index, sha256)], all JPEG bytes in one uint8 tensor, per good item its (offset, length) or
    None, decoded tensors or None, [(index, reason)]). One tensor per batch crosses from the worker, not one
    per image: handing hundreds of small tensors between processes, and pinning each, costs more than
    decoding them. In a worker the bytes are copied once, straight into shared memory."""
    good = [it for it in items if it.error is None]
    spans, offset = [], 0
    for it in good:
        jpeg = isinstance(it.payload, bytes)
        spans.append((offset, len(it.payload)) if jpeg else None)
        offset += len(it.payload) if jpeg else 0
    if torch.utils.data.get_worker_info() is None:
        blob = torch.empty(offset, dtype=torch.uint8)
    else:
        blob = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(offset))
    buffer = blob.numpy()
    for it, span in zip(good, spans):
        if span is not None:
            buffer[span[0]:span[0] + span[1]] = np.frombuffer(it.payload, np.uint8)
    decoded_images = [it.payload if span is None else None for it, span in zip(good, spans)]
    return ([(it.index, it.sha256) for it in good], blob, spans, decoded_images,
            [(it.index, it.error) for it in items if it.error is not None])


class TensorPreprocess:
    """The recipe of `Preprocessing.transform()` (shorter side to `resize` with antialiasing, centre crop,
    normalise) on uint8 CHW tensors of any size, on whatever device they are; returns a channels-last batch."""

    def __init__(self, pre: Preprocessing, device: torch.device):
        self.pre, self.device = pre, device
        std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) / std

    def resized_crop(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] uint8 -> [N, 3, S, S] float in 0..255, sized as torchvision's Resize(int) + CenterCrop."""
        h, w = images.shape[-2:]
        short, long = min(h, w), max(h, w)
        new_long = int(self.pre.resize * long / short)
        size = (self.pre.resize, new_long) if h <= w else (new_long, self.pre.resize)
        x = F.interpolate(images.float(), size, mode=self.pre.interpolation, antialias=True, align_corners=False)
        s = self.pre.image_size
        top, left = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
        return x[:, :, top:top + s, left:left + s]

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Images of equal size are resized together: one resize per size in the batch, not per image."""
        s = self.pre.image_size
        batch = torch.empty((len(images), 3, s, s), device=self.device).contiguous(memory_format=torch.channels_last)
        sizes = defaultdict(list)
        for k, image in enumerate(images):
            sizes[tuple(image.shape[-2:])].append(k)
        for members in sizes.values():
            group = torch.stack([images[k] for k in members]) if len(members) > 1 else images[members[0]][None]
            crops = self.resized_crop(group)
            if len(members) == len(images):
                batch.copy_(crops)
            else:
                batch[torch.tensor(members, device=self.device)] = crops
        # PIL rounds and clamps to uint8 after resizing; clamping keeps bicubic overshoot in range likewise
        return batch.clamp_(0, 255).mul_(self.scale).add_(self.shift)


def gpu_batches(root: Path, samples: list[Sample], pre: Preprocessing, batch_size: int, workers: int,
                device: torch.device, known: Collection[str] = (), decoder: JpegDecoder | None = None):
    """Yield (good [(index, sha256)], normalised channels-last batch on `device` of the good images not
    in `known` (or None), [(index, reason)]) per batch, as `extract.collate` does. A thread decodes and
    preprocesses the next batches (on CUDA on a stream of its own) while the caller runs the model."""
    from torch.utils.data import DataLoader

    prepare = TensorPreprocess(pre, device)
    decoder = decoder or JpegDecoder(device)
    loader = DataLoader(FileBytes(root, samples, known), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_bytes, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None, worker_init_fn=worker_init())
    return prefetched((decoded(batch, decoder, prepare) for batch in loader), device)


def decoded(batch, decoder: JpegDecoder, prepare: TensorPreprocess):
    """One batch from `collate_bytes` to `gpu_batches`'s form: its JPEGs decoded together on the device."""
    good, blob, spans, tensors, bad = batch
    images = [None if t is None else t.to(prepare.device, non_blocking=True) for t in tensors]
    jpegs = [k for k, span in enumerate(spans) if span is not None]
    results = decoder([blob[spans[k][0]:spans[k][0] + spans[k][1]] for k in jpegs])
    failed = set()
    for k, image in zip(jpegs, results):
        if isinstance(image, str):
            bad.append((good[k][0], image))
            failed.add(k)
        else:
            images[k] = image
    if failed:
        bad.sort()
        good = [g for k, g in enumerate(good) if k not in failed]
    computed = [image for image in images if image is not None]   # the rest are reused or failed
    batch = prepare(computed) if computed else None
    if prepare.device.type == "cuda":
        # nvImageCodec's images and its reads of the pinned bytes live outside torch's stream-aware allocator:
        # this thread's stream finishes with them before they are freed (the main thread does not wait)
        torch.cuda.current_stream(prepare.device).synchronize()
    return good, batch, bad


@contextlib.contextmanager
def _native_stderr_silenced():
    """nvImageCodec's C++ side prints a paragraph to stderr for each codec library it cannot load (nvJPEG2000,
    nvTIFF: this project decodes JPEGs only), which is noise for users."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class JpegDecoder:
    """Decodes a batch of JPEGs (uint8 byte tensors) onto `device`: per image a uint8 [3, H, W] tensor, or
    the reason it cannot be decoded. nvImageCodec first where it is installed (on a CPU device in its CPU-only
    mode, which decodes as PIL does), then torchvision's `decode_jpeg` for what it could not decode, then PIL
    image by image, which also names the reason. `decoders` picks and orders them (tests inject failures)."""

    def __init__(self, device: torch.device, decoders: list | None = None):
        self.device = device
        if decoders is None:
            decoders = [self._torchvision]
            nvimgcodec = _nvimgcodec_decoder(device)
            if nvimgcodec is not None:
                decoders.insert(0, nvimgcodec)
        self.decoders = decoders

    @property
    def name(self) -> str:
        return " > ".join([*(getattr(d, "name", "torchvision") for d in self.decoders), "PIL"])

    def __call__(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | str]:
        results: list = [None] * len(encoded)
        for decode in self.decoders:
            todo = [k for k, r in enumerate(results) if r is None]
            if not todo:
                break
            try:
                images = decode([encoded[k] for k in todo])
            except RuntimeError:      # a decoder that refuses the whole batch: the next one gets all of it
                continue
            for k, image in zip(todo, images):
                results[k] = image
        return [r if r is not None else pil_decoded(encoded[k].numpy().tobytes(), self.device)
                for k, r in enumerate(results)]

    def _torchvision(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)


class NvImageCodec:
    """nvImageCodec's batched decoder as a `JpegDecoder` step: None for each image it cannot decode."""
    name = "nvImageCodec"

    def __init__(self, module, device: torch.device):
        self.nv, self.device = module, device
        cpu = device.type != "cuda"
        self.decoder = module.Decoder(
            device_id=module.NVIMGCODEC_DEVICE_CPU_ONLY if cpu else (device.index or 0),
            backends=[module.Backend(module.BackendKind.CPU_ONLY)] if cpu else None)
        self.params = module.DecodeParams(color_spec=module.ColorSpec.SRGB, sample_format=module.SampleFormat.I_RGB,
                                          apply_exif_orientation=True)

    def __call__(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        images = self.decoder.decode([self.nv.CodeStream(e.numpy()) for e in encoded], params=self.params,
                                     cuda_stream=stream)
        return [None if image is None else self._tensor(image) for image in images]

    def _tensor(self, image) -> torch.Tensor:
        if image.buffer_kind == self.nv.ImageBufferKind.STRIDED_DEVICE:
            hwc = torch.as_tensor(image, device=self.device)     # zero-copy through __cuda_array_interface__
        else:
            hwc = torch.from_numpy(np.asarray(image))
        return hwc.permute(2, 0, 1)


def _nvimgcodec_decoder(device: torch.device) -> NvImageCodec | None:
    """nvImageCodec's decoder for `device`, or None where the `[gpu]` extra is not installed or cannot start."""
    try:
        with _native_stderr_silenced():
            from nvidia import nvimgcodec
            return NvImageCodec(nvimgcodec, device)
    except (ImportError, RuntimeError):
        return None


def pil_decoded(data: bytes, device: torch.device) -> torch.Tensor | str:
    """An image decoded by PIL onto `device`, or the reason it cannot be."""
    try:
        return chw_tensor(decode_image(data)).to(device)
    except ImageError as exc:
        return str(exc)




