"""The GPU-style path (bytes in workers, batched decode_jpeg, tensor resize/crop/normalise) runs on CPU
tensors too: it must give the PIL path's inputs and features within a small tolerance."""
from __future__ import annotations

import io
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.make_images import make_images
from pipeline.data.folders import scan
from pipeline.features.backbones.loading import build_backbone
from pipeline.features.inputs.pil import cpu_batches
from pipeline.features.inputs.gpu_decoding import gpu_batches, gpu_decodable
from pipeline.features.inputs.overlap import BackgroundWriter, Block, prefetched
from pipeline.storage.cache import FeatureWriter, cache_attrs, open_cache


def _folder(tmp_path: Path) -> Path:
    root = make_images(tmp_path / "photos", 6, classes=2)
    # one PNG and one CMYK JPEG: both must go through the PIL fallback of the same path
    first = next((root / "train" / "class_00").glob("*.jpg"))
    Image.open(first).save(root / "train" / "class_00" / "png.png")
    Image.open(first).convert("CMYK").save(root / "train" / "class_01" / "cmyk.jpg")
    (root / "train" / "class_01" / "broken.jpg").write_bytes(first.read_bytes()[:2000])
    return root


def test_gpu_decodable_routes_only_whole_rgb_jpegs(tmp_path):
    root = _folder(tmp_path)
    files = {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert gpu_decodable(files["000000.jpg"])
    assert not gpu_decodable(files["png.png"])
    assert not gpu_decodable(files["cmyk.jpg"])
    assert not gpu_decodable(files["broken.jpg"])


def _pil_says_gpu_decodable(data: bytes) -> bool:
    """The rule `gpu_decodable` implements, asked of PIL: a whole JPEG in RGB or L, upright."""
    if not (data.startswith(b"\xff\xd8\xff") and data.rstrip(b"\0").endswith(b"\xff\xd9")):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(0x0112, 1) == 1
    except Exception:
        return False


def _jpeg(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **options)
    return buf.getvalue()


def _corpus() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    files = {"baseline": _jpeg(photo), "progressive": _jpeg(photo, progressive=True),
             "grey": _jpeg(photo.convert("L")), "cmyk": _jpeg(photo.convert("CMYK")),
             "subsampled 4:2:0": _jpeg(photo, subsampling=2), "optimised": _jpeg(photo, optimize=True),
             "with icc profile": _jpeg(photo, icc_profile=b"\0" * 3000)}
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        exif[0x010F] = "camera maker"          # a second tag, so orientation is not the only entry
        files[f"exif orientation {orientation}"] = _jpeg(photo, exif=exif)
    big_endian = bytearray(files["exif orientation 6"])
    exif_at = big_endian.index(b"Exif\0\0") + 6
    files["exif without orientation"] = _jpeg(photo, exif=Image.Exif())
    files["exif with a bad byte order"] = bytes(big_endian[:exif_at] + b"XX" + big_endian[exif_at + 2:])
    baseline = files["baseline"]
    files["truncated"] = baseline[:len(baseline) // 2]
    files["cut in the scan, ending in ffd9"] = baseline[:len(baseline) // 2] + b"\xff\xd9"
    files["header cut"] = baseline[:40] + b"\xff\xd9"
    files["padded with zeros"] = baseline + b"\0" * 100
    frame = baseline.index(b"\xff\xc0")
    files["arithmetic-coded marker"] = baseline[:frame + 1] + b"\xc9" + baseline[frame + 2:]
    files["12-bit precision"] = baseline[:frame + 4] + b"\x0c" + baseline[frame + 5:]
    files["zero width"] = baseline[:frame + 7] + b"\0\0" + baseline[frame + 9:]
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    files["png"] = buf.getvalue()
    files["text"] = b"not an image"
    return files


def test_gpu_decodable_sends_to_nvjpeg_only_what_pil_reads_as_upright_rgb_or_grey():
    files = _corpus()
    decodable = {name for name, data in files.items() if gpu_decodable(data)}
    assert decodable == {"baseline", "progressive", "grey", "subsampled 4:2:0", "optimised", "with icc profile",
                         "exif orientation 1", "exif without orientation", "padded with zeros",
                         "cut in the scan, ending in ffd9"}   # libjpeg, so PIL, fills the missing rows
    # the marker walk is stricter than PIL, never looser: a broken EXIF block, arithmetic coding and
    # 12-bit samples go to PIL, which decodes them or gives the reason
    assert all(_pil_says_gpu_decodable(files[name]) for name in decodable)


@pytest.mark.parametrize("workers", [0, 2])
def test_tensor_path_matches_pil_path(tmp_path, workers):
    root = _folder(tmp_path)
    dataset = scan(root, 0, 0)
    # at 224 px (resize 256) these ~500x375 photos are decoded in full by PIL too, not at reduced scale
    backbone = build_backbone("efficientnet_lite0", "imagenet", image_size=224)
    pre, dev = backbone.preprocessing, torch.device("cpu")
    ref = list(cpu_batches(root, dataset.samples, pre, 64, 0))
    new = list(gpu_batches(root, dataset.samples, pre, 64, workers, dev))
    (good_a, x_a, bad_a), (good_b, x_b, bad_b) = ref[0], new[0]
    assert good_a == good_b and bad_a == bad_b
    assert [dataset.samples[i].path for i, _ in bad_b] == ["train/class_01/broken.jpg"]
    assert x_b.shape == x_a.shape and x_b.is_contiguous(memory_format=torch.channels_last)
    # the same decoder (libjpeg) and resampling: nearly every pixel the same, none more than a grey level off
    grey_levels = ((x_a - x_b).abs() * torch.tensor(pre.std).view(1, 3, 1, 1) * 255).round()
    assert grey_levels.max() <= 1 and (grey_levels == 0).float().mean() > 0.999
    with torch.inference_mode():
        fa = backbone.model(x_a)
        fb = backbone.model(x_b)
    assert torch.nn.functional.cosine_similarity(fa, fb).min() > 0.9999


def _without_segment(jpeg: bytes, marker: int) -> bytes:
    """`jpeg` with its header segments of one kind taken out."""
    out, pos = bytearray(jpeg[:2]), 2
    while jpeg[pos + 1] != 0xDA:
        end = pos + 2 + int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        out += b"" if jpeg[pos + 1] == marker else jpeg[pos:end]
        pos = end
    return bytes(out + jpeg[pos:])


def test_a_batch_the_jpeg_decoder_refuses_is_decoded_by_pil(tmp_path):
    root = make_images(tmp_path / "photos", 5, classes=2)
    first = next((root / "train" / "class_00").glob("*.jpg"))
    no_tables = _without_segment(first.read_bytes(), 0xDB)     # quantisation tables gone, header still fine
    assert gpu_decodable(no_tables)
    (root / "train" / "class_00" / "no tables.jpg").write_bytes(no_tables)
    dataset = scan(root, 0, 0)
    pre = build_backbone("efficientnet_lite0", "imagenet", image_size=224).preprocessing   # full decodes
    (good_a, x_a, bad_a), = cpu_batches(root, dataset.samples, pre, 64, 0)
    (good_b, x_b, bad_b), = gpu_batches(root, dataset.samples, pre, 64, 0, torch.device("cpu"))
    assert good_a == good_b and bad_a == bad_b
    assert [(dataset.samples[i].path, reason) for i, reason in bad_b] == [
        ("train/class_00/no tables.jpg", "cannot decode: broken data stream when reading image file")]
    assert (x_a - x_b).abs().mean() < 0.01     # both decoded by PIL now; only the resampling differs


def test_prefetched_keeps_order_raises_errors_and_stops_its_thread():
    cpu = torch.device("cpu")
    assert list(prefetched(((i, f"batch {i}") for i in range(50)), cpu)) == [(i, f"batch {i}") for i in range(50)]

    def failing():
        yield (1,)
        raise ValueError("unreadable batch")
    got = []
    with pytest.raises(ValueError, match="unreadable batch"):
        for item in prefetched(failing(), cpu):
            got.append(item)
    assert got == [(1,)]

    made = []

    def endless():
        while True:
            made.append(len(made))
            yield (made[-1],)
    items = prefetched(endless(), cpu, depth=2)
    assert [next(items) for _ in range(3)] == [(0,), (1,), (2,)]
    items.close()
    assert not any(t.name == "prefetch" for t in threading.enumerate())
    assert len(made) <= 3 + 2 + 1      # taken, queued, and the one waiting to be queued


def test_background_writer_writes_slabs_in_order(tmp_path):
    attrs = cache_attrs(build_backbone("resnet18", "none").spec(), ["a", "b"], "float32")
    writer = FeatureWriter(tmp_path / "f.h5", attrs, {"none": 4}, "float32")
    background = BackgroundWriter(writer, slab_bytes=256 * 4 * 4)
    rows = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)
    for split in ("train", "val"):
        for start in range(0, 1000, 64):
            block = rows[start:start + 64]
            background.append(Block(split, lambda block=block: {"none": block}, [start // 64 % 2] * len(block),
                                    [f"{split}/{i}" for i in range(start, start + len(block))],
                                    ["0" * 64] * len(block), [], start + len(block)))
    background.close()
    writer.commit()
    cache = open_cache(tmp_path / "f.h5")
    for split in ("train", "val"):
        got = cache.read(split)
        np.testing.assert_array_equal(got.features, rows)
        assert got.paths == [f"{split}/{i}" for i in range(1000)]
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["train/features"].shape == (1000, 4)


def test_background_writer_raises_a_failed_last_write_instead_of_waiting_forever(tmp_path):
    """The last slab is written when the end is queued; if that write fails, the thread must still end and
    `close()` raise what it met (a bounded join: a hang fails the test instead of stopping the suite)."""
    attrs = cache_attrs(build_backbone("resnet18", "none").spec(), ["a", "b"], "float32")
    writer = FeatureWriter(tmp_path / "f.h5", attrs, {"none": 4}, "float32")
    background = BackgroundWriter(writer)

    def vectors():
        raise OSError(28, "No space left on device")
    background.append(Block("train", vectors, [0], ["train/0"], ["0" * 64], [], 1))   # held until the end
    raised: list[BaseException] = []

    def close():
        try:
            background.close()
        except OSError as exc:
            raised.append(exc)
    closing = threading.Thread(target=close, daemon=True)
    closing.start()
    closing.join(timeout=30)
    assert not closing.is_alive() and not background.thread.is_alive()
    assert [str(e) for e in raised] == ["[Errno 28] No space left on device"]
    writer.abort()


def _photos_of_mixed_sizes() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    sizes = [(375, 500), (375, 500), (500, 375), (260, 260), (375, 500), (300, 451), (500, 375)]
    photos = []
    for h, w in sizes:      # smooth content, as photos are, so resampling filters differ little
        small = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        photos.append(Image.fromarray(small).resize((w, h), Image.BICUBIC))
    return photos


def test_batched_resize_gives_the_cpu_paths_pixels_on_images_of_mixed_sizes():
    """Images of mixed sizes are resized together: the same pixels as one at a time, and as the CPU path's
    transform (PIL's Resize + CenterCrop) to one grey level, nearly all exactly."""
    from pipeline.features.backbones import IMAGENET_MEAN, IMAGENET_STD
    from pipeline.features.spec import Preprocessing
    from pipeline.features.inputs.gpu_decoding import TensorPreprocess, chw_tensor
    pre = Preprocessing(224, 256, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
    prepare = TensorPreprocess(pre, torch.device("cpu"))
    photos = _photos_of_mixed_sizes()
    tensors = [chw_tensor(p) for p in photos]
    batch = prepare(tensors)
    one_by_one = torch.cat([prepare([t]) for t in tensors])
    torch.testing.assert_close(batch, one_by_one, rtol=0, atol=1e-5)
    reference = torch.stack([pre.transform()(p) for p in photos])
    grey_levels = ((batch - reference).abs() * torch.tensor(pre.std).view(1, 3, 1, 1) * 255).round()
    assert grey_levels.max() <= 1 and (grey_levels == 0).float().mean() > 0.999


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resampling_matrices_give_the_cpu_paths_resize_and_crop(interpolation):
    """The batched resize (padding, two matrix products per chunk of images, 8-bit rounding after each) gives
    the pixels of the CPU path's resize and crop (PIL, across then down) to one grey level, nearly all
    exactly: on noise, where bicubic overshoots most, shrinking, enlarging, both orientations, tall (which
    Pillow 13 resizes down first when given both axes at once), in one chunk or several."""
    from pipeline.features.backbones import IMAGENET_MEAN, IMAGENET_STD
    from pipeline.features.spec import Preprocessing
    from pipeline.features.inputs.gpu_decoding import TensorPreprocess
    pre = Preprocessing(224, 256, interpolation, IMAGENET_MEAN, IMAGENET_STD)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
              for h, w in [(375, 500), (500, 375), (100, 150), (256, 256), (901, 1203), (230, 300), (1000, 257)]]
    expected = torch.stack([torch.from_numpy(np.array(pre.resize_crop(Image.fromarray(i.permute(1, 2, 0).numpy()))))
                            .permute(2, 0, 1) for i in images]).float()
    for chunk_bytes in (512 << 20, 4 << 20):
        prepare = TensorPreprocess(pre, torch.device("cpu"), chunk_bytes)
        chunks = prepare.chunks(images)
        assert sorted(k for chunk in chunks for k in chunk) == list(range(len(images)))
        for chunk in chunks:     # padded floats within the bound, but for an image larger than it alone
            h, w = (max(images[k].shape[axis] for k in chunk) for axis in (-2, -1))
            assert len(chunk) == 1 or len(chunk) * 3 * h * w * 4 <= chunk_bytes
        assert len(chunks) == (1 if chunk_bytes == 512 << 20 else 5)
        pixels = ((prepare(images) - prepare.shift) / prepare.scale).round()
        # PIL sums in fixed point, float32 cannot tell some sums just below a half from a half
        assert (pixels - expected).abs().max() <= 1 and (pixels == expected).float().mean() > 0.99


def _jpeg_tensors() -> tuple[list[bytes], list[torch.Tensor]]:
    files = [_jpeg(p) for p in _photos_of_mixed_sizes()[:3]]
    return files, [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]


def test_nvimagecodec_decodes_as_pil_does_and_gives_none_for_a_truncated_file():
    nvimgcodec = pytest.importorskip("nvidia.nvimgcodec", reason="the [gpu] extra (nvImageCodec) is not installed")
    from pipeline.features.inputs.gpu_decoding import NvImageCodec
    files, tensors = _jpeg_tensors()
    decode = NvImageCodec(nvimgcodec, torch.device("cpu"))      # its CPU-only mode
    truncated = tensors[0][:len(tensors[0]) // 3].clone()
    images = decode([*tensors, truncated])
    assert images[-1] is None
    for data, image in zip(files, images):
        expected = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(image, expected)


def test_jpeg_decoder_falls_back_in_order_and_names_what_nothing_decodes():
    from pipeline.features.inputs.gpu_decoding import JpegDecoder
    files, tensors = _jpeg_tensors()
    cpu = torch.device("cpu")
    asked = []

    def refuses_the_batch(encoded):
        asked.append(("refuses", len(encoded)))
        raise RuntimeError("batch refused")

    def decodes_the_first_only(encoded):
        asked.append(("first only", len(encoded)))
        return [JpegDecoder(cpu, [])(encoded[:1])[0], *[None] * (len(encoded) - 1)]

    garbage = torch.frombuffer(bytearray(b"\xff\xd8\xff not a jpeg"), dtype=torch.uint8)
    results = JpegDecoder(cpu, [refuses_the_batch, decodes_the_first_only])([*tensors, garbage])
    assert asked == [("refuses", 4), ("first only", 4)]
    for data, image in zip(files, results[:3]):       # the first by the second decoder, the rest by PIL
        expected = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
        assert (image.int() - expected.int()).abs().max() <= 1
    assert results[3] == "not a recognised image"


def test_gpu_batches_with_nvimagecodec_alone_give_the_torchvision_decoders_batches(tmp_path):
    pytest.importorskip("nvidia.nvimgcodec", reason="the [gpu] extra (nvImageCodec) is not installed")
    from pipeline.features.backbones import IMAGENET_MEAN, IMAGENET_STD
    from pipeline.features.spec import Preprocessing
    from pipeline.features.inputs.gpu_decoding import JpegDecoder
    root = _folder(tmp_path)
    dataset = scan(root, 0, 0)
    pre = Preprocessing(224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    cpu = torch.device("cpu")
    both = JpegDecoder(cpu)
    assert both.name == "torchvision > nvImageCodec > PIL"
    torchvision, nv = (JpegDecoder(cpu, [decoder]) for decoder in both.decoders)
    (good_a, x_a, bad_a), = gpu_batches(root, dataset.samples, pre, 64, 0, cpu, decoder=torchvision)
    (good_b, x_b, bad_b), = gpu_batches(root, dataset.samples, pre, 64, 0, cpu, decoder=nv)
    assert good_a == good_b and bad_a == bad_b
    assert (x_a - x_b).abs().max() < 0.05
