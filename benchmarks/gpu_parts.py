"""Where the CUDA fast path spends its time: each part of `gpu_batches` alone, on a benchmark folder.

    python benchmarks/gpu_parts.py DATA [--images 4000] [--workers 8] [--batch-size 256] [--device cuda]

With `--device cpu` the same parts run on the CPU (the byte reading in workers is the same work there).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.folders import scan  # noqa: E402
from pipeline.features.backbones.loading import build_backbone  # noqa: E402
from pipeline.features.inputs.gpu_decoding import (  # noqa: E402
    FileBytes,
    JpegDecoder,
    TensorPreprocess,
    collate_bytes,
    gpu_batches,
)


def rate(name: str, fn, dev: torch.device) -> None:
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    n = fn()
    sync()
    print(f"{name}: {n / (time.perf_counter() - start):,.0f} images/s", flush=True)


def roi_resized_crop(images: list[torch.Tensor], pre) -> torch.Tensor:
    """Resize + centre crop of images of any sizes in one `roi_align` call over their padded batch: bilinear
    samples averaged over each output pixel's area, within about half a grey level of torchvision's
    antialiased resize on photos (a few grey levels at sharp edges)."""
    from torchvision.ops import roi_align
    boxes = []
    for k, image in enumerate(images):
        h, w = image.shape[-2:]
        nh, nw, top, left = pre.geometry(h, w)
        s = pre.image_size
        boxes.append([k, left * w / nw, top * h / nh, (left + s) * w / nw, (top + s) * h / nh])
    padded = torch.nested.nested_tensor(list(images)).to_padded_tensor(0).float()
    ratio = max(1, round(min(min(i.shape[-2:]) for i in images) / pre.resize) + 1)
    return roi_align(padded, torch.tensor(boxes, device=padded.device), pre.image_size, 1.0, ratio, aligned=True)


def per_image_resized_crop(images: list[torch.Tensor], prepare: TensorPreprocess) -> torch.Tensor:
    """The same resize and crop as one antialiased `interpolate` per image (the path before batching)."""
    s, crops = prepare.pre.image_size, []
    for image in images:
        rh, rw, top, left = prepare.pre.geometry(*image.shape[-2:])
        x = F.interpolate(image[None].float(), (rh, rw), mode=prepare.pre.interpolation, antialias=True)
        crops.append(x[:, :, top:top + s, left:left + s])
    return torch.cat(crops)


def host_time(images: list[torch.Tensor], prepare: TensorPreprocess) -> None:
    """The host's share of resizing a batch (Python, and launching kernels on a GPU), which caps the GPU path
    where the device's share is small: the same batch at a tenth of the size, so the work itself is small,
    timed without waiting for the device; and the number of torch operations (on a GPU, about one kernel
    launch each)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counted(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.operations = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.operations += 1
            return func(*args, **(kwargs or {}))

    tiny = [image[:, ::10, ::10].contiguous() for image in images]
    small = TensorPreprocess(replace(prepare.pre, resize=prepare.pre.resize // 10,
                                     image_size=prepare.pre.image_size // 10), prepare.device)
    with Counted() as counted:
        small(tiny)
    with Counted() as one_size:
        small([tiny[0]] * len(tiny))
    best = min(timed(lambda: small(tiny)) for _ in range(5))
    print(f"resize, crop, normalise: host time only, {best * 1e3:.1f} ms and {counted.operations} torch operations "
          f"per batch of {len(images)} ({one_size.operations} for images of one size)", flush=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    from torchvision.io import ImageReadMode, decode_jpeg
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="image folder")
    p.add_argument("--images", type=int, default=4000, help="first N images")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    args = p.parse_args()
    samples, dev, bs = scan(args.data, 0, 0).samples[:args.images], torch.device(args.device), args.batch_size
    pre = TensorPreprocess(build_backbone("resnet50", "none").preprocessing, dev)
    loader = DataLoader(FileBytes(args.data, samples), batch_size=bs, num_workers=args.workers,
                        collate_fn=collate_bytes, pin_memory=dev.type == "cuda", prefetch_factor=4)
    rate(f"read bytes in {args.workers} workers", lambda: sum(len(b[0]) for b in loader), dev)
    raw = [torch.frombuffer(bytearray((args.data / s.path).read_bytes()), dtype=torch.uint8) for s in samples]
    chain = JpegDecoder(dev)
    for decode in chain.decoders:
        name = getattr(decode, "name", "torchvision decode_jpeg")
        decode(raw[:bs])
        rate(f"{name} on {dev}, batches of {bs}",
             lambda: sum(len(decode(raw[i:i + bs])) for i in range(0, len(raw), bs)), dev)
    images = decode_jpeg(raw[:4 * bs], mode=ImageReadMode.RGB, device=dev)
    pre(images[:bs])
    rate(f"resize, crop, normalise on {dev} (resampling matrices)",
         lambda: sum(len(pre(images[i:i + bs])) for i in range(0, len(images), bs)), dev)
    host_time(images[:bs], pre)
    rate(f"the same as one interpolate per image on {dev} (an alternative, not used)",
         lambda: sum(len(per_image_resized_crop(images[i:i + bs], pre)) for i in range(0, len(images), bs)), dev)
    rate(f"the same as one roi_align over the padded batch on {dev} (an alternative, not used)",
         lambda: sum(len(roi_resized_crop(images[i:i + bs], pre.pre)) for i in range(0, len(images), bs)), dev)
    for decode in chain.decoders:
        only = JpegDecoder(dev, [decode])
        rate(f"all three in gpu_batches (decoding and resizing on two threads, {only.name})",
             lambda: sum(len(b[0]) for b in gpu_batches(args.data, samples, pre.pre, bs, args.workers, dev,
                                                         decoder=only)), dev)


if __name__ == "__main__":
    main()
