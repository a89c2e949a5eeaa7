"""The GPU-style path (bytes in workers, batched decode_jpeg, tensor resize/crop/normalise) runs on CPU
tensors too: it must give the PIL path's inputs and features within a small tolerance."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from benchmarks.make_images import make_images
from pipeline.backbones import load_backbone
from pipeline.data import scan
from pipeline.extract import cpu_batches
from pipeline.fastpath import BackgroundWriter, gpu_batches, gpu_decodable
from pipeline.store import FeatureWriter, cache_attrs, open_cache


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


def test_tensor_path_matches_pil_path(tmp_path):
    root = _folder(tmp_path)
    dataset = scan(root, 0, 0)
    backbone = load_backbone("efficientnet_lite0", "imagenet", image_size=96)
    pre, dev = backbone.preprocessing, torch.device("cpu")
    ref = list(cpu_batches(root, dataset.samples, pre.transform(), 64, 0))
    new = list(gpu_batches(root, dataset.samples, pre, 64, 0, dev))
    (good_a, x_a, bad_a), (good_b, x_b, bad_b) = ref[0], new[0]
    assert good_a == good_b and bad_a == bad_b
    assert [dataset.samples[i].path for i, _ in bad_b] == ["train/class_01/broken.jpg"]
    assert x_b.shape == x_a.shape and x_b.is_contiguous(memory_format=torch.channels_last)
    # inputs in normalised units (1/255 of a pixel is 0.008 here): JPEG decoders and resampling
    # differ by about a grey level on average
    diff = (x_a - x_b).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.5
    with torch.inference_mode():
        fa = backbone.model(x_a)
        fb = backbone.model(x_b)
    assert torch.nn.functional.cosine_similarity(fa, fb).min() > 0.995


def test_background_writer_writes_slabs_in_order(tmp_path):
    attrs = cache_attrs(load_backbone("resnet18", "none").spec(), ["a", "b"], "float32")
    writer = FeatureWriter(tmp_path / "f.h5", attrs, {"none": 4}, "float32")
    background = BackgroundWriter(writer, slab_bytes=256 * 4 * 4)
    rows = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)
    for split in ("train", "val"):
        for start in range(0, 1000, 64):
            block = rows[start:start + 64]
            background.append(split, {"none": block}, [start // 64 % 2] * len(block),
                              [f"{split}/{i}" for i in range(start, start + len(block))], ["0" * 64] * len(block),
                              [], start + len(block))
    background.close()
    writer.commit()
    cache = open_cache(tmp_path / "f.h5")
    for split in ("train", "val"):
        got = cache.read(split)
        np.testing.assert_array_equal(got.features, rows)
        assert got.paths == [f"{split}/{i}" for i in range(1000)]
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["train/features"].shape == (1000, 4)
