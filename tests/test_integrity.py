"""Stage two, predict and compare refuse a feature cache or model directory that fails its check,
with one line naming the problem."""
from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import shutil
from contextlib import closing
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from sklearn.pipeline import make_pipeline

from pipeline.api import load_model
from pipeline.features.backbones.loading import recorded_backbone
from pipeline.features.spec import BackboneSpec
from pipeline.heads import stored
from pipeline.heads.classifiers import CLASSIFIERS, make_head
from pipeline.heads.train import PREPROCESSING, _preprocessor, scores_of
from pipeline.runtime.errors import InputError
from pipeline.runtime.files import sha256_file
from pipeline.storage import modeldir
from pipeline.storage.cache import StoredVectors, open_cache, seal
from pipeline.tuning.training import FinetuneNetwork, network
from tests.conftest import cli_in_process
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
    line = one_line_error(cli_in_process("train", bad, "--out", tmp_path / "m"))
    assert f"feature cache {bad}" in line and words in line
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def model_dir(small_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "logreg"
    cli_in_process("train", small_cache, "--classifier", "logreg", "--param", "C=1", "--out", out, "--quiet", check=True)
    return out


def damaged_copy(model_dir: Path, tmp_path: Path, edit) -> Path:
    bad = tmp_path / "logreg"
    shutil.copytree(model_dir, bad)
    edit(bad / "head.safetensors")
    return bad


def test_predict_refuses_an_edited_head(model_dir, tmp_path, small_cache):
    bad = damaged_copy(model_dir, tmp_path, lambda head: head.write_bytes(head.read_bytes() + b"\0"))
    line = one_line_error(cli_in_process("predict", bad, small_cache.parent / "images"))
    assert line == (f"error: {bad / 'head.safetensors'} does not match the SHA-256 recorded in model.json; "
                    f"refusing to load it")


def test_compare_refuses_an_edited_head(model_dir, tmp_path):
    edited = damaged_copy(model_dir, tmp_path, lambda head: head.write_bytes(b"not a head"))
    line = one_line_error(cli_in_process("compare", model_dir, edited, "--out", tmp_path / "reports"))
    assert line == (f"error: {edited / 'head.safetensors'} does not match the SHA-256 recorded in model.json; "
                    f"refusing to load it")
    assert not (tmp_path / "reports").exists()


def test_predict_refuses_a_missing_head(model_dir, tmp_path, small_cache):
    missing = damaged_copy(model_dir, tmp_path, Path.unlink)
    line = one_line_error(cli_in_process("predict", missing, small_cache.parent / "images"))
    assert line == f"error: model directory {missing} lacks head.safetensors"


# Data the cache can prove: checksums verified on every read, values checked on load.

def load_all(path: Path):
    """What `train` takes from a cache: every split, the class list, the dataset digest."""
    with open_cache(path) as cache:
        return [cache.read(s) for s in cache.splits], cache.classes, cache.dataset_id()


def same(a, b) -> bool:
    return a[1:] == b[1:] and all(np.array_equal(x.features, y.features) and np.array_equal(x.labels, y.labels)
                                  and x.paths == y.paths and x.sha256 == y.sha256 for x, y in zip(a[0], b[0]))


def flip_bit(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def chunk_offset(path: Path, name: str) -> tuple[int, int]:
    """File offset and size of the first chunk of dataset `name`."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(0)
        return info.byte_offset, info.size


@pytest.mark.parametrize("name", ["train/features", "val/labels", "test/sha256"])
def test_a_flipped_bit_in_the_data_is_refused_by_its_checksum(small_cache, tmp_path, name):
    bad = tmp_path / "features.h5"
    shutil.copy(small_cache, bad)
    offset, size = chunk_offset(bad, name)
    flip_bit(bad, offset + size // 3, 5)
    line = one_line_error(cli_in_process("train", bad, "--out", tmp_path / "m")) if name == "train/features" else None
    with pytest.raises(InputError, match=f"feature cache {bad}: {name} cannot be read, the file is damaged"):
        load_all(bad)
    if line:
        assert line.startswith(f"error: feature cache {bad}: {name} cannot be read, the file is damaged (")
        assert not (tmp_path / "m").exists()


def test_random_bit_flips_are_refused_or_change_nothing(small_cache, tmp_path):
    """Single-bit flips anywhere in a real cache: each is refused with one error, or fell in unused
    space and the data read is unchanged. Never a changed vector, label, path or class, never a crash."""
    reference = load_all(small_cache)
    data = small_cache.read_bytes()
    rng = np.random.default_rng(0)
    outcomes = {"refused": 0, "unchanged": 0}
    for _ in range(200):
        bad = bytearray(data)
        offset = int(rng.integers(len(bad)))
        bad[offset] ^= 1 << int(rng.integers(8))
        (tmp_path / "f.h5").write_bytes(bytes(bad))
        try:
            got = load_all(tmp_path / "f.h5")
        except InputError:
            outcomes["refused"] += 1
            continue
        assert same(got, reference), f"a flip at byte {offset} changed the data silently"
        outcomes["unchanged"] += 1
    assert outcomes["refused"] >= 20, outcomes


def restamp(path: Path) -> None:
    """Record the digests and checksum anew, as a tool that wrote wrong values in good faith would."""
    with h5py.File(path, "r+") as f:
        seal(f)


def rotate_sha256(f: h5py.File) -> None:
    f["train/sha256"][:] = np.roll(f["train/sha256"][:], 1)


def test_a_column_rewritten_through_hdf5_is_refused_by_its_digest(small_cache, tmp_path):
    """Rotating the sha256 column with h5py keeps HDF5's checksums valid; the digest recorded at commit
    catches it, so vectors are never reassigned to the wrong images (here, or on reuse by extract)."""
    bad = tmp_path / "features.h5"
    shutil.copy(small_cache, bad)
    with h5py.File(bad, "r+") as f:
        rotate_sha256(f)
    line = one_line_error(cli_in_process("train", bad, "--out", tmp_path / "m"))
    assert line == (f"error: feature cache {bad}: train/sha256 does not match the digest recorded when it was "
                    f"written (damaged or edited); re-run `pipeline extract`")


def edit_classes(f):
    f.attrs["classes"] = json.dumps(["red"])


def write_labels(value):
    def edit(f):
        labels = f["train/labels"][:]
        labels[0] = value
        f["train/labels"][:] = labels
    return edit


def float_labels(f):
    labels = f["val/labels"][:]
    del f["val/labels"]
    f.create_dataset("val/labels", data=labels.astype(np.float64), chunks=True, fletcher32=True)


def replace_features(shape):
    def edit(f):
        del f["val/features"]
        f.create_dataset("val/features", data=np.zeros(shape, np.float32), chunks=True, fletcher32=True)
    return edit


def nan_row(f):
    features = f["test/features"][:]
    features[1] = np.nan
    f["test/features"][:] = features


def empty_split(f):
    for name in list(f["val"]):
        f["val"][name].resize(0, axis=0)


def old_schema(f):
    f.attrs["schema_version"] = 2


@pytest.mark.parametrize("edit, words", [
    (edit_classes, "attribute classes must be a list of at least two distinct names"),
    (write_labels(-1), "train has labels outside its 3 classes (e.g. -1)"),
    (write_labels(99), "train has labels outside its 3 classes (e.g. 99)"),
    (float_labels, "val/labels must be one column of integers"),
    (replace_features((4,)), "val/features must be [rows, "),
    (replace_features((4, 7)), "val/features must be [rows, "),
    (nan_row, "1 rows of test hold features that are not finite (NaN or inf)"),
    (empty_split, "split 'val' has no rows"),
    (old_schema, "has schema version 2 (written before caches carried checksums), this tool reads 3 and 4"),
])
def test_wrong_values_with_valid_checksums_are_one_error_line(small_cache, tmp_path, edit, words):
    bad = tmp_path / "features.h5"
    shutil.copy(small_cache, bad)
    with h5py.File(bad, "r+") as f:
        edit(f)
    restamp(bad)
    with pytest.raises(InputError, match=re.escape(words)):
        load_all(bad)


def test_bad_labels_through_the_command_line(small_cache, tmp_path):
    bad = tmp_path / "features.h5"
    shutil.copy(small_cache, bad)
    with h5py.File(bad, "r+") as f:
        write_labels(-1)(f)
    restamp(bad)
    line = one_line_error(cli_in_process("train", bad, "--out", tmp_path / "m"))
    assert line == f"error: feature cache {bad}: train has labels outside its 3 classes (e.g. -1)"


def test_non_finite_vectors_are_not_reused(small_cache, tmp_path):
    bad = tmp_path / "features.h5"
    shutil.copy(small_cache, bad)
    with h5py.File(bad, "r+") as f:
        nan_row(f)
        nan_digest = f["test/sha256"][1].decode()
    restamp(bad)
    stored = StoredVectors(open_cache(bad))
    with closing(stored):
        vectors = stored.read(list(stored.where))
    assert nan_digest not in stored.where and np.isfinite(vectors["global_pool"]).all()
    assert len(stored.where) == sum(len(s.labels) for s in load_all(small_cache)[0]) - 1


def test_stored_vectors_are_read_in_the_order_asked_across_splits(small_cache):
    with open_cache(small_cache) as cache:
        expected = {d: v for split in cache.splits for d, v in zip(cache.read(split).sha256, cache.read(split).features)}
    stored = StoredVectors(open_cache(small_cache))
    with closing(stored):
        asked = sorted(stored.where, reverse=True)          # splits interleaved, rows out of order
        asked = asked + asked[:2]                           # and asked twice
        np.testing.assert_array_equal(stored.read(asked)["global_pool"], np.stack([expected[d] for d in asked]))


def test_a_cache_replaced_while_open_is_not_mixed_in(small_cache, tmp_path):
    """`train` reads everything through one open file: a new cache renamed over it meanwhile (as
    extract does) does not leak into the reads that follow."""
    path, other = tmp_path / "features.h5", tmp_path / "other.h5"
    shutil.copy(small_cache, path)
    shutil.copy(small_cache, other)
    with h5py.File(other, "r+") as f:
        f["val/features"][:] = f["val/features"][:] + 1
    restamp(other)
    reference = load_all(small_cache)
    with open_cache(path) as cache:
        first = cache.read("train")
        os.replace(other, path)
        later = [cache.read(s) for s in ("val", "test")]
    assert same(([first, *later], *reference[1:]), reference)


class Payload:
    """Pickled, it would write `marker` when unpickled: what an edited head file could run."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "the payload ran")


def is_pickle(data: bytes) -> bool:
    """Whether `data` reads as a pickle from its first byte to a STOP."""
    try:
        return [op.name for op, _, _ in pickletools.genops(data)][-1] == "STOP"
    except Exception:
        return False


@pytest.mark.parametrize("name, words", [
    ("head.joblib", "holds head.joblib, a pickle, which this version never loads; train it again with the same "
                    "`pipeline train` command to write head.safetensors"),
    ("head.safetensors", "head.safetensors cannot be read as a features model"),
])
def test_a_head_file_holding_a_pickle_is_refused_and_never_unpickled(model_dir, tmp_path, small_cache, name, words):
    bad = tmp_path / "pickled"
    shutil.copytree(model_dir, bad)
    marker = tmp_path / "marker"
    (bad / "head.safetensors").unlink()
    (bad / name).write_bytes(pickle.dumps(Payload(marker)))
    info = json.loads((bad / "model.json").read_text())
    del info["files"]["head.safetensors"]
    info["files"][name] = sha256_file(bad / name)   # digests that match: the edit is not caught by them
    (bad / "model.json").write_text(json.dumps(info))
    for args in (("predict", bad, small_cache.parent / "images"), ("export", bad, "--out", tmp_path / "model.onnx")):
        line = one_line_error(cli_in_process(*args))
        assert line.startswith("error: ") and words in line
    with pytest.raises(InputError, match=re.escape(words)):
        load_model(bad).predict_features(np.zeros((1, 1280), np.float32))
    compared = cli_in_process("compare", bad, "--out", tmp_path / "reports")   # reads metrics, not the head
    assert compared.returncode == (2 if name == "head.joblib" else 0)
    assert not marker.exists() and not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("directory, written", [("model_dir", {"head.safetensors", "familiarity.npz"}),
                                                ("finetuned", {"weights.safetensors", "checkpoint.safetensors",
                                                               "familiarity.npz"})])
def test_no_file_of_a_trained_model_directory_is_a_pickle(request, directory, written):
    folder = request.getfixturevalue(directory)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert written <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        assert not is_pickle(data) and b"joblib" not in data and b"pickle" not in data, path


def planted(finetuned: Path, tmp_path: Path, name: str, marker: Path) -> Path:
    """A copy of `finetuned` with a pickle payload written as `name` in place of its weights, digests updated."""
    bad = tmp_path / "pickled"
    shutil.copytree(finetuned, bad)
    info = json.loads((bad / "model.json").read_text())
    if name.startswith("weights"):
        (bad / "weights.safetensors").unlink()
        del info["files"]["weights.safetensors"]
    (bad / name).write_bytes(pickle.dumps(Payload(marker)))
    info["files"][name] = sha256_file(bad / name)   # digests that match: the edit is not caught by them
    (bad / "model.json").write_text(json.dumps(info))
    return bad


@pytest.mark.parametrize("name, words", [
    ("weights.pt", "holds weights.pt, a pickle, which this version never loads; fine-tune it again with the same "
                   "`pipeline finetune` command to write weights.safetensors"),
    ("checkpoint.pt", "holds checkpoint.pt, a pickle, which this version never loads; fine-tune it again"),
    ("weights.safetensors", "weights.safetensors cannot be read as a finetuned model"),
])
def test_a_fine_tuned_model_holding_a_pickle_is_refused_and_never_unpickled(finetuned, tmp_path, name, words):
    marker = tmp_path / "marker"
    bad = planted(finetuned, tmp_path, name, marker)
    images = finetuned.parent / "images" / "test"
    for args in (("predict", bad, images, "--device", "cpu"), ("export", bad, "--out", tmp_path / "model.onnx"),
                 ("visualize", bad, images, "--gradcam", "--out", tmp_path / "visual", "--device", "cpu")):
        line = one_line_error(cli_in_process(*args))
        assert words in line, args
    with pytest.raises(InputError, match=re.escape(words)):
        load_model(bad).predict(images, device="cpu")
    compared = cli_in_process("compare", bad, "--out", tmp_path / "reports")   # reads metrics, not the weights
    assert compared.returncode == (0 if name == "weights.safetensors" else 2)
    assert not marker.exists() and not (tmp_path / "model.onnx").exists() and not (tmp_path / "visual").exists()


@pytest.mark.parametrize("name, words", [
    ("checkpoint.pt", "is a pickle, which this version never loads; run the same command with --checkpoint "
                      "instead of --resume to start again"),
    ("checkpoint.safetensors", "is not a readable fine-tuning checkpoint"),
])
def test_a_checkpoint_holding_a_pickle_is_refused_unread(finetuned, tmp_path, name, words):
    marker = tmp_path / "marker"
    bad = planted(finetuned, tmp_path, name, marker)
    line = one_line_error(cli_in_process("finetune", finetuned.parent / "images", "--out", bad, "--strategy", "head",
                                         "--epochs", 1, "--image-size", 64, "--batch-size", 12, "--workers", 0,
                                         "--device", "cpu", "--resume", bad / name))
    assert f"checkpoint {bad / name} {words}" in line
    assert not marker.exists()


def test_fine_tuned_weights_saved_and_loaded_give_the_same_outputs(finetuned, tmp_path):
    info = modeldir.read_info(finetuned)
    torch.manual_seed(0)
    net = FinetuneNetwork(recorded_backbone(BackboneSpec.from_dict(info["backbone"]), weights="none"),
                          len(info["classes"])).eval()
    path = tmp_path / modeldir.FINETUNED.model_file
    modeldir.FINETUNED.dump(net.state_dict(), path, info)
    loaded = network(info, modeldir.FINETUNED.load(path))
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images), net(images), atol=1e-6, rtol=0)
    assert not is_pickle(path.read_bytes())


@pytest.mark.parametrize("classifier", list(CLASSIFIERS))
def test_every_head_stored_and_loaded_gives_the_same_scores(small_cache, tmp_path, classifier):
    with open_cache(small_cache) as cache:
        train_, test = cache.read("train"), cache.read("test")
    X, y, X_test = train_.features, train_.labels, test.features
    spec = CLASSIFIERS[classifier]
    fixed = {"epochs": 5} if spec.early_stops else {}
    for preprocess in PREPROCESSING:
        fitted = make_pipeline(_preprocessor(preprocess), make_head(classifier, spec.grid[0], **fixed)).fit(X, y)
        path = tmp_path / modeldir.FEATURES.model_file
        modeldir.FEATURES.dump(stored.state(fitted, classifier), path, {})
        loaded = stored.restored(*modeldir.FEATURES.load(path))
        np.testing.assert_allclose(scores_of(loaded, X_test, 3), scores_of(fitted, X_test, 3), atol=1e-6, rtol=0)
        assert (loaded.predict(X_test) == fitted.predict(X_test)).all()
        assert not is_pickle(path.read_bytes())
