"""The feature cache: incremental reuse, atomic replacement, several layers, training-split
statistics, and stage two refusing a cache made otherwise than expected."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.data.folders import scan
from pipeline.features.backbones.loading import build_backbone
from pipeline.features.extract import extract
from pipeline.features.settings import ExtractSettings
from pipeline.heads.train import TrainSettings, train
from pipeline.runtime.errors import InputError
from pipeline.storage.cache import check_expected, open_cache
from tests.conftest import COLOURS, cli_in_process, embedder_calls, make_image_folder, synthetic_cache, tiny_image


@pytest.fixture(scope="module")
def lite0():
    return build_backbone(image_size=64)


def rows_of(path: Path) -> dict[str, tuple[str, str, np.ndarray]]:
    """{image path: (class, split, vector)} of a cache."""
    cache = open_cache(path)
    out = {}
    for split in cache.splits:
        part = cache.read(split)
        for p, y, v in zip(part.paths, part.labels, part.features):
            out[p] = (cache.classes[y], split, v)
    return out


def test_rerun_computes_only_new_and_changed_images(tmp_path: Path, lite0):
    root = make_image_folder(tmp_path / "images", {"all": 6}, split_folders=False)
    out = tmp_path / "features.h5"
    with embedder_calls() as seen:
        first = extract(scan(root), lite0, out, ExtractSettings(workers=0), quiet=True)
    assert sum(seen) == 18 and (first.computed, first.reused) == (18, 0)
    before = rows_of(out)

    tiny_image(COLOURS["red"], 1000).save(root / "red" / "new.png")             # added
    (root / "green" / "all_0.png").unlink()                                     # removed
    (root / "blue" / "all_1.png").rename(root / "red" / "moved.png")            # relabelled
    tiny_image(COLOURS["green"], 2000).save(root / "green" / "all_2.png")       # changed in place
    with embedder_calls() as seen:
        second = extract(scan(root), lite0, out, ExtractSettings(workers=0), quiet=True)
    assert sum(seen) == 2                                                       # new.png and all_2.png
    assert (second.extracted, second.computed, second.reused) == (18, 2, 16)
    assert "(2 computed, 16 reused)" in second.lines()[0]

    after = rows_of(out)
    assert "green/all_0.png" not in after and "blue/all_1.png" not in after
    assert after["red/moved.png"][0] == "red"
    np.testing.assert_array_equal(after["red/moved.png"][2], before["blue/all_1.png"][2])
    for path in set(before) & set(after) - {"green/all_2.png"}:
        np.testing.assert_array_equal(after[path][2], before[path][2])
    assert not np.array_equal(after["green/all_2.png"][2], before["green/all_2.png"][2])

    full = extract(scan(root), lite0, tmp_path / "full.h5", ExtractSettings(workers=0), quiet=True)   # none before
    assert full.reused == 0
    fresh = rows_of(tmp_path / "full.h5")
    assert {p: r[:2] for p, r in fresh.items()} == {p: r[:2] for p, r in after.items()}
    for path in fresh:
        np.testing.assert_allclose(after[path][2], fresh[path][2], atol=2e-3)


def test_a_cache_made_otherwise_is_not_reused(tmp_path: Path, lite0):
    root = make_image_folder(tmp_path / "images", {"train": 2, "val": 1})
    out = tmp_path / "features.h5"
    extract(scan(root), lite0, out, ExtractSettings(workers=0), quiet=True)
    tta = build_backbone(image_size=64, tta=True)
    with embedder_calls() as seen:
        summary = extract(scan(root), tta, out, ExtractSettings(workers=0), quiet=True)
    assert sum(seen) == 2 * 9 and summary.reused == 0                          # each image and its mirror
    assert [n for n in summary.notes if not n.startswith("onnxruntime:")] == [   # not the engine's export note
        "previous cache not reused, made otherwise: tta: false != true"]
    with embedder_calls() as seen:
        assert extract(scan(root), tta, out, ExtractSettings(workers=0, reuse=False), quiet=True).reused == 0
    assert sum(seen) == 2 * 9


@pytest.mark.parametrize("made, differs", [
    ({"precision": "bfloat16", "engine": "torch"}, "compute.precision: bfloat16 != float32"),
    ({"decoding": "tensor"}, "compute.inputs: tensor != PIL")])   # the GPU path's code, run on CPU tensors
def test_vectors_computed_otherwise_are_not_reused_for_float32_pil(tmp_path: Path, lite0, made, differs):
    """The fingerprint covers how vectors were computed: the forward pass's precision and the inputs' path."""
    root = make_image_folder(tmp_path / "images", {"train": 2, "val": 1})
    out = tmp_path / "features.h5"
    extract(scan(root), lite0, out, ExtractSettings(workers=0, **made), quiet=True)
    with embedder_calls() as seen:
        summary = extract(scan(root), lite0, out, ExtractSettings(workers=0, precision="float32", decoding="pil"),
                          quiet=True)
    assert sum(seen) == 9 and summary.reused == 0 and "PIL decoding, float32" in summary.device
    assert [n for n in summary.notes if not n.startswith("onnxruntime:")] == [
        f"previous cache not reused, made otherwise: {differs}"]
    assert extract(scan(root), lite0, out, ExtractSettings(workers=0), quiet=True).reused == 9   # now the same


def test_an_unreadable_previous_cache_is_replaced(tmp_path: Path, lite0):
    root = make_image_folder(tmp_path / "images", {"train": 2, "val": 1})
    out = tmp_path / "features.h5"
    out.write_bytes(b"half a file")
    summary = extract(scan(root), lite0, out, ExtractSettings(workers=0), quiet=True)
    assert summary.notes[0].startswith("previous cache not reused: feature cache")
    assert "is not a readable HDF5 file" in summary.notes[0]
    assert summary.computed == 9 and open_cache(out).splits == ["train", "val"]


def test_a_failed_extraction_leaves_the_previous_cache_whole(tmp_path: Path, lite0):
    root = make_image_folder(tmp_path / "images", {"train": 2, "val": 1})
    out = tmp_path / "features.h5"
    extract(scan(root), lite0, out, ExtractSettings(workers=0), quiet=True)
    previous = out.read_bytes()

    def fail_on_second_batch(n):
        if n == 2:
            raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"), embedder_calls(fail_on_second_batch):
        extract(scan(root), lite0, out, ExtractSettings(batch_size=4, workers=0, reuse=False), quiet=True)
    assert out.read_bytes() == previous
    assert list(tmp_path.glob("*.tmp")) == []


def test_several_layers_in_one_file(tmp_path: Path, lite0):
    root = make_image_folder(tmp_path / "images", {"train": 2, "val": 1})
    extract(scan(root), lite0, tmp_path / "plain.h5", ExtractSettings(workers=0), quiet=True)
    two = build_backbone(layer=["blocks.5", "global_pool"], image_size=64)
    extract(scan(root), two, tmp_path / "two.h5", ExtractSettings(workers=0), quiet=True)

    cache = open_cache(tmp_path / "two.h5")
    assert cache.layers == ["blocks.5", "global_pool"] and cache.attrs["layer"] == "blocks.5"
    with h5py.File(tmp_path / "two.h5") as f:
        assert f["train/features"].shape == (6, 192) and f["train/features@global_pool"].shape == (6, 1280)
    plain = open_cache(tmp_path / "plain.h5")
    for split in ("train", "val"):
        np.testing.assert_allclose(cache.read(split, "global_pool").features, plain.read(split).features,
                                   atol=2e-3)
    with pytest.raises(InputError, match="has no features of layer 'head'; it has blocks.5, global_pool"):
        cache.read("train", "head")


def test_compute_stats_normalises_with_the_training_split(tmp_path: Path, lite0):
    from PIL import Image
    train_colours = {"dark": [(10, 20, 30), (50, 60, 70)], "light": [(200, 100, 0), (90, 180, 250)]}
    for split, colours in (("train", train_colours), ("val", {"dark": [(0, 0, 0)], "light": [(255, 255, 255)]})):
        for name, values in colours.items():
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for i, value in enumerate(values):
                Image.new("RGB", (80, 64), value).save(tmp_path / "images" / split / name / f"{i}.png")
    pixels = np.array([v for values in train_colours.values() for v in values]) / 255
    out = tmp_path / "stats.h5"
    extract(scan(tmp_path / "images"), lite0, out, ExtractSettings(workers=0, compute_stats=True), quiet=True)

    attrs = open_cache(out).attrs
    stats, transform = json.loads(attrs["stats"]), json.loads(attrs["transform"])
    np.testing.assert_allclose(stats["mean"], pixels.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["std"], pixels.std(0), atol=1e-5)
    assert stats["images"] == 4 and attrs["compute_stats"]
    assert (transform["mean"], transform["std"]) == (stats["mean"], stats["std"])

    extract(scan(tmp_path / "images"), lite0, tmp_path / "plain.h5", ExtractSettings(workers=0), quiet=True)
    plain = open_cache(tmp_path / "plain.h5")
    assert plain.attrs["fingerprint"] != attrs["fingerprint"] and not plain.attrs["compute_stats"]
    assert not np.allclose(plain.read("train").features, open_cache(out).read("train").features, atol=1e-2)


def test_expected_fields_are_checked_and_named(small_cache: Path, tmp_path: Path):
    cache = open_cache(small_cache)
    check_expected(cache, {"backbone": "efficientnet_lite0", "image_size": "64", "tta": "false",
                           "fingerprint": cache.attrs["fingerprint"][:12]})
    with pytest.raises(InputError, match=r"\(cache != expected\): backbone: efficientnet_lite0 != resnet18; "
                                        r"tta: false != true$"):
        check_expected(cache, {"backbone": "resnet18", "image_size": 64, "tta": True})
    with pytest.raises(InputError, match=f"fingerprint: {cache.attrs['fingerprint'][:8]} != 00000000"):
        check_expected(cache, {"fingerprint": "00000000"})
    with pytest.raises(InputError, match="cannot expect 'colour'"):
        check_expected(cache, {"colour": "red"})
    metrics = train(small_cache, tmp_path / "model", TrainSettings("logreg"), {"backbone": "efficientnet_lite0"})
    assert metrics["n_train"] > 0


def test_train_command_refuses_a_cache_made_otherwise(small_cache: Path, tmp_path: Path):
    proc = cli_in_process("train", small_cache, "--out", tmp_path / "model", "--expect", "backbone=resnet18",
                   "--expect", "image_size=64")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: feature cache {small_cache} was made otherwise than expected "
                                   f"(cache != expected): backbone: efficientnet_lite0 != resnet18")
    assert not (tmp_path / "model").exists()


def test_extract_command_reports_reuse_and_records_the_data_folder(small_cache: Path, tmp_path: Path):
    assert open_cache(small_cache).data_root == str((small_cache.parent / "images").resolve())
    out = tmp_path / "features.h5"
    shutil.copy(small_cache, out)
    shutil.copytree(small_cache.parent / "images", tmp_path / "moved")
    proc = cli_in_process("extract", "moved", "--out", out, "--image-size", 64, "--workers", 0, cwd=tmp_path, check=True)
    assert "extracted 48 + skipped 0 = found 48 images (0 computed, 48 reused)" in proc.stderr
    assert open_cache(out).data_root == str(tmp_path / "moved")   # absolute; not in the fingerprint


def test_a_cache_without_a_recorded_data_folder_reads_as_none(tmp_path: Path):
    X = np.eye(4, dtype=np.float32)
    path = synthetic_cache(tmp_path / "old.h5", {"train": (X, np.array([0, 1, 0, 1]))}, ["a", "b"])
    assert open_cache(path).data_root is None


def test_extract_help_documents_every_option():
    text = cli_in_process("extract", "--help", check=True).stdout
    for option in ("--labels", "--id-column", "--label-column", "--exclude", "--backbone", "--weights", "--layer",
                   "--image-size", "--compute-stats", "--tta", "--batch-size", "--device", "--dtype", "--workers",
                   "--val-fraction", "--test-fraction", "--seed", "--reuse", "--no-reuse", "--quiet"):
        assert option in text, option


def test_extract_params_accept_the_new_settings():
    from pipeline.runtime.settings import from_mapping
    p = from_mapping(ExtractSettings, {"labels": "labels.csv", "label_column": "breed", "compute_stats": True,
                                       "layer": ["blocks.5", "global_pool"], "tta": True, "reuse": False}, "extract")
    assert (p.labels, p.id_column, p.layer, p.compute_stats, p.tta, p.reuse) == \
        ("labels.csv", "id", ["blocks.5", "global_pool"], True, True, False)
    with pytest.raises(InputError, match="extract.tta must be true or false, got 'yes'"):
        from_mapping(ExtractSettings, {"tta": "yes"}, "extract")
    with pytest.raises(InputError, match="extract.image_size must be an integer or null, got True"):
        from_mapping(ExtractSettings, {"image_size": True}, "extract")
