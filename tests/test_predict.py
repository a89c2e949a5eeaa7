"""`pipeline predict` on real images: top-k output in each format, skipped files, agreement with the
cached features, and refusal of model directories whose files do not match each other."""
import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.heads.settings import train_settings
from pipeline.heads.train import scores_of, train
from pipeline.models.directory import open_model
from pipeline.models.predict import predict
from pipeline.runtime.errors import InputError
from pipeline.storage import modeldir
from pipeline.storage.cache import open_cache
from tests.conftest import COLOURS, cli_in_process, tiny_image


@pytest.fixture(scope="module")
def model(small_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "logreg"
    train(small_cache, out, train_settings("logreg", {"C": 10}))
    return out


@pytest.fixture(scope="module")
def new_images(tmp_path_factory) -> Path:
    """Two unseen images per colour, plus files that cannot be read."""
    folder = tmp_path_factory.mktemp("new")
    for name, colour in COLOURS.items():
        for i in range(2):
            tiny_image(colour, 1000 + i, size=56).save(folder / f"{name}_{i}.png")
    (folder / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "report.pdf").write_bytes(b"%PDF-1.4\n")   # reported as extract reports it
    os.mkfifo(folder / "pipe.png")                      # would block a reader forever
    return folder


def true_class(path: str) -> str:
    return Path(path).name.split("_")[0]


def test_json_lists_top_k_in_order_and_skips_unreadable_files(model, new_images):
    proc = cli_in_process("predict", model, new_images, "--top-k", 3, "--format", "json", check=True)
    results = {Path(r["path"]).name: r for r in json.loads(proc.stdout)}
    unusable = {"truncated.png", "empty.jpg", "report.pdf", "pipe.png"}
    assert set(results) == {f"{c}_{i}.png" for c in COLOURS for i in range(2)} | unusable
    for name, r in results.items():
        if name in unusable:
            assert "top" not in r and f"skipped {new_images / name}: {r['error']}" in proc.stderr
            continue
        scores = [t["score"] for t in r["top"]]
        assert sorted({t["class"] for t in r["top"]}) == sorted(COLOURS)     # all 3 classes
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-6)
        assert r["top"][0]["class"] == true_class(name)
    assert results["empty.jpg"]["error"] == "empty file"
    assert results["report.pdf"]["error"] == "not an image file type (.pdf)"
    assert results["pipe.png"]["error"] == "not a regular file"


def test_a_fifo_or_device_given_by_name_is_reported_not_read(model, new_images):
    proc = cli_in_process("predict", model, new_images / "pipe.png", "/dev/zero", new_images / "red_0.png", check=True)
    assert proc.stdout.splitlines()[:2] == [f"{new_images / 'pipe.png'}: skipped (unreadable: a FIFO, not a regular file)",
                                            "/dev/zero: skipped (unreadable: a character device, not a regular file)"]


@pytest.mark.slow
def test_csv_and_table(model, new_images):
    proc = cli_in_process("predict", model, new_images / "red_0.png", new_images / "empty.jpg", "--top-k", 2,
                   "--format", "csv", check=True)
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [(Path(r["path"]).name, r["rank"]) for r in rows] == [("red_0.png", "1"), ("red_0.png", "2"),
                                                                  ("empty.jpg", "")]
    assert rows[0]["class"] == "red" and float(rows[0]["score"]) >= float(rows[1]["score"])
    assert rows[2]["error"] == "empty file"

    proc = cli_in_process("predict", model, new_images / "blue_1.png", new_images / "empty.jpg", "--top-k", 1,
                   check=True)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"{new_images / 'blue_1.png'}: blue ") and len(lines[0].split()) == 3
    assert lines[1] == f"{new_images / 'empty.jpg'}: skipped (empty file)"


def test_predict_agrees_with_the_cached_features(model, small_cache):
    """The backbone recorded in model.json, run on the original images, gives the cached vectors' scores."""
    cache = open_cache(small_cache)
    test = cache.read("test")
    images = [small_cache.parent / "images" / p for p in test.paths]
    results = predict(model, images, top_k=3, device="cpu")
    directory = open_model(model)
    expected = directory.calibration.apply(scores_of(directory.model, test.features, 3))   # calibrated, as predicted
    for r, row in zip(results, expected):
        got = {t["class"]: t["score"] for t in r["top"]}
        np.testing.assert_allclose([got[c] for c in cache.classes], row, atol=2e-3)   # cache holds float16
        assert r["top"][0]["class"] == cache.classes[row.argmax()]


def tamper_head(d: Path):
    with open(d / "head.safetensors", "ab") as f:
        f.write(b"\0")


def tamper_digest(d: Path):
    info = json.loads((d / "model.json").read_text())
    info["files"]["head.safetensors"] = "0" * 64
    (d / "model.json").write_text(json.dumps(info))


def forget_digest(d: Path):
    info = json.loads((d / "model.json").read_text())
    info["files"] = {}
    (d / "model.json").write_text(json.dumps(info))


@pytest.mark.parametrize("tamper, message", [
    (tamper_head, "does not match the SHA-256 recorded in model.json"),
    (tamper_digest, "does not match the SHA-256 recorded in model.json"),
    (forget_digest, "records no SHA-256 for head.safetensors"),
    (lambda d: (d / "head.safetensors").unlink(), "lacks head.safetensors"),
    (lambda d: (d / "model.json").unlink(), "is not a model directory"),
])
def test_mismatched_model_directory_is_refused(model, tmp_path, tamper, message):
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    tamper(bad)
    with pytest.raises(InputError, match=message):
        modeldir.load(bad)


def test_edited_head_is_refused_by_the_command_line(model, new_images, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    tamper_head(bad)
    proc = cli_in_process("predict", bad, new_images / "red_0.png")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: {bad / 'head.safetensors'} does not match the SHA-256 recorded in "
                                   f"model.json; refusing to load it")
    assert proc.stdout == ""


def test_extract_and_predict_decode_large_jpegs_alike(tmp_path):
    """Photos much larger than the model's input are decoded at reduced scale by `extract` and `predict`
    alike: the cache holds the vectors of the reduced decode, and predict reproduces its scores."""
    import torch

    from pipeline.data.images import read_image
    from pipeline.features.backbones.loading import build_backbone
    from pipeline.features.engines.torch import Embedder
    from pipeline.features.extract import extract_folder
    from pipeline.features.settings import ExtractSettings
    images = tmp_path / "images"
    for split, n in (("train", 3), ("val", 2)):
        for name in ("red", "blue"):
            (images / split / name).mkdir(parents=True)
            for i in range(n):
                photo = tiny_image(COLOURS[name], 100 * i + len(split), size=320).resize((640, 480))
                photo.save(images / split / name / f"{i}.jpg", quality=90)
    out = tmp_path / "f.h5"
    extract_folder(images, out, ExtractSettings(image_size=64, workers=0, dtype="float32"), quiet=True)
    val = open_cache(out).read("val")
    backbone = build_backbone(image_size=64)
    pre, embed = backbone.preprocessing, Embedder(backbone, torch.device("cpu"))
    paths = [images / p for p in val.paths]

    def vectors(shortest):
        batch = torch.stack([pre.transform()(read_image(p, shortest)[0]) for p in paths])
        return embed(batch)[backbone.layer]
    np.testing.assert_allclose(val.features, vectors(pre.resize), atol=1e-4)
    assert np.abs(val.features - vectors(None)).max() > 1e-3     # the full decode differs a little

    model = tmp_path / "logreg"
    train(out, model, train_settings("logreg", {"C": 10, "calibration": "none"}))   # the head's own scores
    results = predict(model, paths, top_k=2, device="cpu")
    expected = scores_of(open_model(model).model, val.features, 2)
    for r, row in zip(results, expected):
        got = {t["class"]: t["score"] for t in r["top"]}
        np.testing.assert_allclose([got[c] for c in open_cache(out).classes], row, atol=1e-5)
