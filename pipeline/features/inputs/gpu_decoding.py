"""JPEG decoding and preprocessing on the GPU, the fast path of stage one on CUDA.

On CUDA, DataLoader workers only read file bytes (and hash them); each batch of JPEGs is decoded on the
GPU in one call, then resized, cropped and normalised there, the whole batch in a few kernels. Decoders, in
order, each taking only the images the one before could not decode: torchvision's `decode_jpeg`, NVIDIA
nvImageCodec (the optional `[gpu]` extra: nvJPEG, with the hardware JPEG engines of A100/H100-class GPUs,
and a CPU thread pool of its own), PIL. torchvision comes first because it was the faster of the two on an
H200 (benchmarks/RESULTS.md); nvImageCodec also decodes where torchvision's GPU decoder is gone (it is
deprecated since torchvision 0.29). Files that are not plain baseline/progressive RGB or
greyscale JPEGs are decoded by PIL in the worker and join the same resize, so every image goes through
one preprocessing recipe.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import torch

from pipeline.data.folders import Sample
from pipeline.data.images import FileItem, ImageError, SampleFiles, batches_within, decode_image, worker_init
from pipeline.features.backbones.loading import Preprocessing
from pipeline.features.inputs.overlap import prefetched

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


FILTER_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def window_taps(lengths: list[int], resized: list[int], interpolation: str) -> int:
    """PIL's `ksize` for resizing `lengths` to `resized` pixels (the widest of them): the input pixels one
    output pixel can draw on."""
    return max(2 * math.ceil(FILTER_SUPPORT[interpolation] * max(n / r, 1.0)) + 1 for n, r in zip(lengths, resized))


def _filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """The resampling kernels of antialiased resizing in torch and PIL: triangle, or Keys' cubic (a = -0.5)."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1 - x).clamp_(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(lengths: torch.Tensor, resized: torch.Tensor, offsets: torch.Tensor, out: int, padded: int,
                   interpolation: str, taps: int) -> torch.Tensor:
    """[N, out, padded] matrices taking each image's pixels along one axis (`lengths` long, zero-padded to
    `padded`) to the `out` pixels from `offsets` on of that axis resized to `resized`: the weights of PIL's
    resampling (which torch's antialiased `interpolate` copies), so a resize and crop of the whole batch is
    two batched matrix products. As in PIL, they are computed in float64 and rounded to 22 fractional bits
    (exact in float32): in float32 throughout, 0.5% of the pixels of a bilinear resize rounded the other way.
    Only each output pixel's window is computed (`taps`, at least PIL's `ksize`: `window_taps`), then scattered."""
    lengths, resized, offsets = (t.double()[:, None, None] for t in (lengths, resized, offsets))
    scale = lengths / resized
    support = FILTER_SUPPORT[interpolation] * scale.clamp(min=1)
    centre = scale * (offsets + torch.arange(out, device=lengths.device, dtype=torch.float64)[None, :, None] + 0.5)
    first = (centre - support + 0.5).trunc().clamp(min=0)
    stop = torch.minimum((centre + support + 0.5).trunc(), lengths)
    j = first + torch.arange(taps, device=lengths.device, dtype=torch.float64)
    w = _filter((j - centre + 0.5) / scale.clamp(min=1), interpolation) * (j < stop)
    w = ((w / w.sum(-1, keepdim=True)) * 2.0 ** 22).round().float() / 2.0 ** 22
    dense = torch.zeros((len(w), out, padded), device=w.device)
    return dense.scatter_add_(2, j.long().clamp_(max=padded - 1), w)     # clamped taps add zeros


class TensorPreprocess:
    """The recipe of `Preprocessing.transform()` (shorter side to `resize` with antialiasing, centre crop,
    normalise) on uint8 CHW tensors of any size, on whatever device they are; returns a channels-last batch.
    A batch of images of mixed sizes is resized in a few kernels, not a few per image: zero-padded to a
    common size and multiplied by per-image resampling matrices (`resize_weights`), in chunks of at most
    `chunk_bytes` of padded floats (images sorted by height and width, so little is padding).

    The pixels are the CPU path's (`Preprocessing.resize_crop`), nearly all exactly and the rest to a grey
    level: PIL resizes across, then down, rounding to 8 bits after each pass, and so does this, in float32
    (float16 would round some pixels the other way). Without the rounding, a network's features on noisy
    photos moved up to 0.5% in cosine (benchmarks/RESULTS.md)."""

    def __init__(self, pre: Preprocessing, device: torch.device, chunk_bytes: int = 512 << 20):
        self.pre, self.device, self.chunk_bytes = pre, device, chunk_bytes
        std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) / std

    def to_device(self, values: list) -> torch.Tensor:
        """A small int64 tensor of `values` on the device without waiting: through pinned memory on CUDA
        (a plain copy from pageable memory would block this thread until the GPU caught up)."""
        cpu = torch.tensor(values)
        if self.device.type == "cuda":
            return cpu.pin_memory().to(self.device, non_blocking=True)
        return cpu.to(self.device)

    def chunks(self, images: list[torch.Tensor]) -> list[list[int]]:
        """Indices of `images`, sorted by height and width, in runs of at most `chunk_bytes` of padded floats."""
        chunks, h, w = [], 0, 0
        for k in sorted(range(len(images)), key=lambda k: images[k].shape[-2:]):
            ih, iw = images[k].shape[-2:]
            h, w = max(h, ih), max(w, iw)
            if not chunks or (len(chunks[-1]) + 1) * 3 * h * w * 4 > self.chunk_bytes:
                chunks.append([])
                h, w = ih, iw
            chunks[-1].append(k)
        return chunks

    def resized_crops(self, images: list[torch.Tensor]) -> torch.Tensor:
        """[3, H, W] uint8 images of any sizes -> [N, 3, S, S] float32 in 0..255 (not yet rounded)."""
        s, n = self.pre.image_size, len(images)
        h, w = (max(i.shape[axis] for i in images) for axis in (-2, -1))
        runs = [list(run) for _, run in itertools.groupby(images, key=lambda image: image.shape[-2:])]
        if len(runs) == 1:                  # one size: nothing to pad
            padded = torch.stack(images)
        else:                               # one copy per run of images of one size
            padded = torch.zeros((n, 3, h, w), dtype=torch.uint8, device=self.device)
            start = 0
            for run in runs:
                ih, iw = run[0].shape[-2:]
                padded[start:start + len(run), :, :ih, :iw] = torch.stack(run) if len(run) > 1 else run[0]
                start += len(run)
        plan = [[*i.shape[-2:], *self.pre.geometry(*i.shape[-2:])] for i in images]     # h, w, rh, rw, top, left
        sizes, interpolation = self.to_device(plan), self.pre.interpolation
        hs, ws, rhs, rws, _, _ = zip(*plan)
        rows = resize_weights(sizes[:, 0], sizes[:, 2], sizes[:, 4], s, h, interpolation,
                              window_taps(hs, rhs, interpolation))
        cols = resize_weights(sizes[:, 1], sizes[:, 3], sizes[:, 5], s, w, interpolation,
                              window_taps(ws, rws, interpolation))
        across = torch.bmm(padded.float().view(n, 3 * h, w), cols.transpose(1, 2))            # [N, 3H, S]
        return torch.matmul(rows[:, None], to_8_bits(across).view(n, 3, h, s))                 # [N, 3, S, S]

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        s = self.pre.image_size
        batch = torch.empty((len(images), 3, s, s), device=self.device, memory_format=torch.channels_last)
        for chunk in self.chunks(images):
            batch[self.to_device(chunk)] = self.resized_crops([images[i] for i in chunk])
        return to_8_bits(batch).mul_(self.scale).add_(self.shift)


def to_8_bits(x: torch.Tensor) -> torch.Tensor:
    """Rounded half up and clamped to 0..255 in place, as PIL stores each pass of a resize."""
    return x.add_(0.5).floor_().clamp_(0, 255)


def gpu_batches(root: Path, samples: list[Sample], pre: Preprocessing, batch_size: int, workers: int,
                device: torch.device, known: Collection[str] = (), decoder: JpegDecoder | None = None,
                ends: Sequence[int] = ()):
    """Why so many parameters: those of `inputs.pil.cpu_batches`, which it stands in for, and the device's.
    Yield (good [(index, sha256)], normalised channels-last batch on `device` of the good images not
    in `known` (or None), [(index, reason)]) per batch, as `extract.collate` does, none across one of `ends`
    (`batches_within`). Two threads work ahead of the caller's model, each on a CUDA stream of its own: one
    decodes the next batches, the other resizes the batches decoded before (the decoders and the resize
    kernels release the GIL, so the two overlap)."""
    from torch.utils.data import DataLoader

    prepare = TensorPreprocess(pre, device)
    decoder = decoder or JpegDecoder(device)
    loader = DataLoader(FileBytes(root, samples, known), batch_sampler=batches_within(len(samples), batch_size, ends),
                        num_workers=workers, collate_fn=collate_bytes, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None, worker_init_fn=worker_init())
    decoded_batches = prefetched((decoded(batch, decoder, device) for batch in loader), device)
    return prefetched((preprocessed(batch, prepare) for batch in decoded_batches), device)


def decoded(batch, decoder: JpegDecoder, device: torch.device):
    """One batch from `collate_bytes` as (good, images on `device` (None: reused), bad): its JPEGs decoded
    together; those that fail join `bad`."""
    good, blob, spans, tensors, bad = batch
    images = [None if t is None else t.to(device, non_blocking=True) for t in tensors]
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
        images = [image for k, image in enumerate(images) if k not in failed]
    return good, images, bad


def preprocessed(batch, prepare: TensorPreprocess):
    """A decoded batch in `gpu_batches`'s form."""
    good, images, bad = batch
    computed = [image for image in images if image is not None]   # the rest are reused
    return good, prepare(computed) if computed else None, bad


@contextlib.contextmanager
def _native_stderr_silenced():
    """nvImageCodec's C++ side prints a paragraph to stderr for each codec library it cannot load (nvJPEG2000,
    nvTIFF: this project decodes JPEGs only), which is noise for users."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:   # to silence a library's own prints; no file of the user's
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class JpegDecoder:
    """Decodes a batch of JPEGs (uint8 byte tensors) onto `device`: per image a uint8 [3, H, W] tensor, or
    the reason it cannot be decoded. torchvision's `decode_jpeg` first, then nvImageCodec where it is installed
    (on a CPU device in its CPU-only mode, which decodes as PIL does) for what torchvision refused, then PIL
    image by image, which also names the reason. `decoders` picks and orders them (tests inject failures)."""

    def __init__(self, device: torch.device, decoders: list | None = None):
        self.device = device
        if decoders is None:
            decoders = [self._torchvision]
            nvimgcodec = _nvimgcodec_decoder(device)
            if nvimgcodec is not None:
                decoders.append(nvimgcodec)
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
    """nvImageCodec's batched decoder as a `JpegDecoder` step: None for each image it cannot decode. On CUDA
    its images are copied into torch's memory and its stream finished before it returns: its own buffers and
    its reads of the (pinned) bytes are unknown to torch's stream-aware allocators, which could otherwise
    reuse that memory while a queued kernel still uses it."""
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
        tensors = [None if image is None else self._tensor(image) for image in images]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return tensors

    def _tensor(self, image) -> torch.Tensor:
        if image.buffer_kind == self.nv.ImageBufferKind.STRIDED_DEVICE:
            return torch.as_tensor(image, device=self.device).permute(2, 0, 1).contiguous()
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


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




