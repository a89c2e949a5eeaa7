"""Stage two, predict and compare refuse a feature cache or model directory that fails its check,
with one line naming the problem."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest

from tests.conftest import run_cli
from tests.test_bad_input import one_line_error


def drop_sha256(f: h5py.File) -> None:
    del f["train/sha256"]


def cut_labels(f: h5py.File) -> None:
    f["val/labels"].resize(f["val/labels"].shape[0] - 1, axis=0)


def edit_backbone(f: h5py.File) -> None:
    f.attrs["backbone"] = "resnet18"   # the vectors no longer match what the attributes claim


@pytest.mark.parametrize("damage, words", [
    (drop_sha256, "split 'train' lacks datasets ['sha256']"),
    (cut_labels, "split 'val' row counts disagree"),
    (edit_backbone, "fingerprint does not match its attributes"),
])
def test_train_refuses_a_damaged_cache(small_cache, tmp_path, damage, words):
    bad = tmp_path / "features.h5"
    shutil.copy(small_cache, bad)
    with h5py.File(bad, "r+") as f:
        damage(f)
    line = one_line_error(run_cli("train", bad, "--out", tmp_path / "m"))
    assert f"feature cache {bad}" in line and words in line
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def model_dir(small_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "logreg"
    run_cli("train", small_cache, "--classifier", "logreg", "--param", "C=1", "--out", out, "--quiet", check=True)
    return out


def damaged_copy(model_dir: Path, tmp_path: Path, edit) -> Path:
    bad = tmp_path / "logreg"
    shutil.copytree(model_dir, bad)
    edit(bad / "head.joblib")
    return bad


def test_predict_refuses_an_edited_head(model_dir, tmp_path, small_cache):
    bad = damaged_copy(model_dir, tmp_path, lambda head: head.write_bytes(head.read_bytes() + b"\0"))
    line = one_line_error(run_cli("predict", bad, small_cache.parent / "images"))
    assert line == f"error: {bad / 'head.joblib'} does not match the SHA-256 recorded in model.json; refusing to load it"


def test_compare_refuses_an_edited_head(model_dir, tmp_path):
    edited = damaged_copy(model_dir, tmp_path, lambda head: head.write_bytes(b"not a pickle"))
    line = one_line_error(run_cli("compare", model_dir, edited, "--out", tmp_path / "reports"))
    assert line == f"error: {edited / 'head.joblib'} does not match the SHA-256 recorded in model.json; refusing to load it"
    assert not (tmp_path / "reports").exists()


def test_predict_refuses_a_missing_head(model_dir, tmp_path, small_cache):
    missing = damaged_copy(model_dir, tmp_path, Path.unlink)
    line = one_line_error(run_cli("predict", missing, small_cache.parent / "images"))
    assert line == f"error: model directory {missing} lacks head.joblib"
