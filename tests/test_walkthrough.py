"""The whole two-stage idea through the real command line: extract once, train, predict, compare."""
import json

import h5py
import numpy as np
import pytest
import torch

from pipeline.data.images import read_image
from pipeline.features.backbones.loading import build_backbone
from pipeline.storage.cache import open_cache
from tests.conftest import COLOURS, cli_in_process, make_image_folder, tiny_image


def test_cache_follows_the_schema(small_cache):
    with h5py.File(small_cache) as f:
        for key in ("schema_version", "classes", "backbone", "weights", "weights_sha256", "layer",
                    "image_size", "transform", "fingerprint", "created", "tool_version"):
            assert key in f.attrs, key
        assert json.loads(f.attrs["classes"]) == sorted(COLOURS)
        assert f.attrs["backbone"] == "efficientnet_lite0" and f.attrs["layer"] == "global_pool"
        for split, n in (("train", 24), ("val", 12), ("test", 12)):
            g = f[split]
            assert g["features"].shape == (n, 1280) and g["features"].dtype == np.float16
            assert g["labels"].shape == g["paths"].shape == g["sha256"].shape == (n,)
            assert all(p.decode().startswith(f"{split}/") for p in g["paths"][:])
        assert f["skipped"].shape == (0,)
    assert not list(small_cache.parent.glob("*.tmp"))


def test_cached_vectors_equal_the_hooked_global_pool(small_cache):
    cache = open_cache(small_cache)
    split = cache.read("val")
    backbone = build_backbone("efficientnet_lite0", image_size=64)
    image, digest = read_image(small_cache.parent / "images" / split.paths[0])
    assert digest == split.sha256[0]
    with torch.inference_mode():
        x = backbone.preprocessing.transform()(image)[None]
        direct = backbone.model.forward_head(backbone.model.forward_features(x), pre_logits=True)
    np.testing.assert_allclose(split.features[0], direct[0].numpy(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("classifier", ["logreg", "linear_svm", "torch_linear"])
def test_classifiers_train_on_the_cache_alone(small_cache, tmp_path, classifier):
    out = tmp_path / classifier
    proc = cli_in_process("train", small_cache, "--classifier", classifier, "--out", out, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_split"] == "test" and metrics["n_eval"] == 12 and metrics["n_train"] == 24
    assert metrics["top1"] >= 0.9, proc.stderr       # colours are trivially separable for ImageNet features
    info = json.loads((out / "model.json").read_text())
    assert info["fingerprint"] == open_cache(small_cache).attrs["fingerprint"]
    assert len(json.loads((out / "confusion.json").read_text())) == 12


@pytest.mark.slow
def test_predict_and_compare(small_cache, tmp_path):
    model = tmp_path / "logreg"
    cli_in_process("train", small_cache, "--out", model, "--param", "C=10", check=True)
    new = tmp_path / "new"
    new.mkdir()
    tiny_image(COLOURS["blue"], 999).save(new / "blue.png")
    (new / "broken.jpg").write_bytes(b"not an image")
    proc = cli_in_process("predict", model, new, "--format", "json", "--top-k", "2", check=True)
    results = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(proc.stdout)}
    assert results["blue.png"]["top"][0]["class"] == "blue" and len(results["blue.png"]["top"]) == 2
    assert "error" in results["broken.jpg"] and "skipped" in proc.stderr
    proc = cli_in_process("compare", model, "--out", tmp_path / "reports", check=True)
    assert "| logreg |" in proc.stdout
    assert json.loads((tmp_path / "reports" / "compare.json").read_text())[0]["name"] == "logreg"


def test_unreadable_file_is_skipped_and_recorded(tmp_path):
    images = make_image_folder(tmp_path / "images", {"train": 3, "val": 2})
    (images / "train" / "red" / "empty.png").write_bytes(b"")
    (images / "train" / "red" / "notes.jpg").write_text("hello")
    (images / "val" / "blue" / "readme.txt").write_text("hello")
    out = tmp_path / "f.h5"
    proc = cli_in_process("extract", images, "--out", out, "--image-size", 64, "--workers", 0, check=True)
    assert "extracted 15 + skipped 3 = found 18" in proc.stderr
    with h5py.File(out) as f:
        skipped = {p.decode(): r.decode() for p, r in f["skipped"][:]}
        assert f["train/features"].shape[0] == 9 and f["val/features"].shape[0] == 6
    assert skipped == {"train/red/empty.png": "empty file", "train/red/notes.jpg": "not a recognised image",
                       "val/blue/readme.txt": "not an image file type (.txt)"}
    for path in skipped:
        assert f"skipped {path}" in proc.stderr
