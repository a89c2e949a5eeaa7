"""Model directories of both kinds through predict, export and visualize; replacing one at --out; written
whole or not at all (a real file size limit); malformed ones refused with one error line."""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.tuning.training import curves
from pipeline.heads.settings import train_settings
from pipeline.heads.train import train
from pipeline.models.directory import open_model
from pipeline.models.export import export
from pipeline.models.predict import predict
from pipeline.models.visualize import sample
from pipeline.runtime.errors import InputError
from tests.conftest import COLOURS, ROOT, cli_in_process, make_image_folder, synthetic_cache, tiny_image


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("md") / "images", {"train": 4, "val": 3, "test": 2})


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("md_photo") / "photo.png"
    tiny_image(COLOURS["green"], 4242, size=90).save(path)
    return path


def documented_export_snippet() -> str:
    text = (ROOT / "docs" / "classifiers.md").read_text()
    return re.search(r"\*\*Export\.\*\*.*?```python no-run\n(.*?)```", text, re.S).group(1)


@pytest.mark.slow
def test_a_fine_tuned_model_exports_and_the_documented_recipe_runs_it_on_a_new_image(finetuned, photo, tmp_path,
                                                                                  monkeypatch):
    proc = cli_in_process("export", finetuned, "--out", tmp_path / "model.pt2")
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "photo.jpg").symlink_to(photo)   # the recipe's file names
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(documented_export_snippet(), namespace)
    expected = predict(finetuned, [photo], top_k=3, device="cpu")[0]
    scores = namespace["scores"].numpy()[0]
    assert namespace["meta"]["scores"] == expected["scores"] == "probabilities"
    assert namespace["meta"]["classes"][scores.argmax()] == expected["top"][0]["class"]
    np.testing.assert_allclose(np.sort(scores)[::-1], [t["score"] for t in expected["top"]], atol=1e-4)
    export(finetuned, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").stat().st_size > 1e6


def test_visualize_and_gradcam_show_the_same_images_of_a_fine_tuned_model(finetuned, images, tmp_path):
    proc = cli_in_process("visualize", finetuned, images / "test", images / "val", "--limit", 5, "--gradcam",
                   "--out", tmp_path / "v", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "5 images" in proc.stderr and "Grad-CAM of the same 5 images" in proc.stderr
    assert Image.open(tmp_path / "v" / "gradcam.png").size[0] > 500


def test_the_sample_is_exactly_limit_readable_images_spread_over_the_folder(tmp_path):
    paths = []
    for i in range(50):
        paths.append(tmp_path / f"{i:02d}.png")
        if i in (0, 14):
            paths[-1].write_bytes(b"not an image")
        else:
            tiny_image(COLOURS["red"], i, size=16).save(paths[-1])
    shown = [p.name for p, _ in sample(paths, 24, 16)]
    assert len(shown) == 24 and shown == sorted(shown) and "00.png" not in shown and "14.png" not in shown
    assert shown[-1] == "49.png"   # spread to the end, not cut short
    assert len(sample(paths[:5], 24, 16)) == 4   # all readable ones when there are fewer


def test_gradcam_of_a_knn_model_is_refused_before_anything_is_written(small_cache, tmp_path):
    train(small_cache, tmp_path / "knn", train_settings("knn", {"n_neighbors": 3}))
    proc = cli_in_process("visualize", tmp_path / "knn", small_cache.parent / "images" / "test", "--gradcam",
                   "--out", tmp_path / "v")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "knn" in proc.stderr
    assert not (tmp_path / "v").exists()


@pytest.mark.slow
def test_decision_values_are_labelled_in_every_format(small_cache, photo, tmp_path):
    svm = tmp_path / "svm"
    train(small_cache, svm, train_settings("linear_svm", {"C": 1.0, "calibration": "none"}))   # its own scores
    result = json.loads(cli_in_process("predict", svm, photo, "--format", "json", check=True).stdout)[0]
    assert result["scores"] == "decision values"
    rows = cli_in_process("predict", svm, photo, "--format", "csv", "--top-k", 2, check=True).stdout.splitlines()
    assert rows[0].split(",")[4] == "scores" and rows[1].split(",")[4] == "decision values"
    line = cli_in_process("predict", svm, photo, check=True).stdout.strip()
    assert "(decision values, not probabilities)" in line   # then the note of an unfamiliar image


@pytest.mark.slow
def test_an_existing_model_directory_is_replaced_only_with_force(small_cache, tmp_path):
    out = tmp_path / "model"
    cli_in_process("train", small_cache, "--out", out, "--param", "C=1", check=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = synthetic_cache(tmp_path / "other.h5", {s: (np.eye(4, 8, dtype=np.float32) + i, np.arange(4) % 2)
                                                     for i, s in enumerate(("train", "val"))}, ["a", "b"])
    proc = cli_in_process("train", other, "--out", out, "--classifier", "knn", "--param", "n_neighbors=1")
    assert proc.returncode == 2 and proc.stderr == (f"error: --out {out} already holds a model directory; pass "
                                                    f"--force to replace it or choose another --out\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    cli_in_process("train", other, "--out", out, "--classifier", "knn", "--param", "n_neighbors=1", "--force", check=True)
    assert open_model(out).approach == "knn" and open_model(out).classes == ["a", "b"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]   # no temporary folder left

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    proc = cli_in_process("train", small_cache, "--out", tmp_path / "notes", "--force")
    assert proc.returncode == 2 and "todo.txt" in proc.stderr and (tmp_path / "notes" / "todo.txt").exists()

    cached = tmp_path / "cached"
    cli_in_process("train", small_cache, "--out", cached, "--param", "C=1", check=True)
    proc = cli_in_process("compare", out, cached, "--out", tmp_path / "reports")
    assert proc.returncode == 2 and f"cannot compare {cached} with {out}:" in proc.stderr


def _limited(size: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return apply


def test_a_failed_write_keeps_the_previous_model_directory(small_cache, tmp_path):
    """A real limit on file sizes (RLIMIT_FSIZE) in the training process, as a full disk would do."""
    out = tmp_path / "model"
    cli_in_process("train", small_cache, "--out", out, "--param", "C=1", check=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", str(small_cache), "--out", str(out),
                           "--param", "C=10", "--force"], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, preexec_fn=_limited(8192), timeout=600)
    assert proc.returncode == 2 and proc.stderr == f"error: cannot write model directory {out}: File too large; {out} is left as it was\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def _edit_info(model: Path, **changes) -> None:
    info = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**info, **changes}))


@pytest.mark.slow
def test_malformed_model_directories_are_one_line_errors(finetuned, small_cache, photo, tmp_path):
    import shutil

    from pipeline.runtime.files import sha256_file
    code = tmp_path / "code"
    shutil.copytree(finetuned, code)
    torch.save({"head.weight": Fraction(1, 3)}, code / "weights.safetensors")   # a pickle, not safetensors
    info = json.loads((code / "model.json").read_text())
    _edit_info(code, files={**info["files"], "weights.safetensors": sha256_file(code / "weights.safetensors")})
    proc = cli_in_process("predict", code, photo)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: {code / 'weights.safetensors'} cannot be read as a finetuned model")

    for files in ([], None):
        bad = tmp_path / f"files_{files}"
        shutil.copytree(finetuned, bad)
        _edit_info(bad, files=files)
        proc = cli_in_process("predict", bad, photo)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "'files' must be a dict" in proc.stderr

    short = tmp_path / "short_ft"
    shutil.copytree(finetuned, short)
    _edit_info(short, classes=["blue", "green"])
    with pytest.raises(InputError, match=f"{short / 'weights.safetensors'} does not fit the network"):
        open_model(short).scorer(torch.device("cpu"))
    head = tmp_path / "short_head"
    train(small_cache, head, train_settings("logreg", {"C": 1.0}))
    _edit_info(head, classes=["blue", "green"])
    proc = cli_in_process("predict", head, photo)
    assert proc.returncode == 2 and proc.stderr == (f"error: {head / 'head.safetensors'} predicts class indices 0..2 but "
                                                    f"{head / 'model.json'} lists 2 classes\n")


def test_curves_have_whole_epoch_ticks():
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "train_acc": e / 3, "val_acc": e / 4}
               for e in (1, 2)]
    fig = curves(history, "two epochs")
    fig.canvas.draw()
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks)
