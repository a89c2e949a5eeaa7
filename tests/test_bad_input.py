"""Bad input: one clear line naming the path and the problem, exit code 2, no traceback."""
import pytest

from tests.conftest import make_image_folder, run_cli


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_missing_data_folder(tmp_path):
    line = one_line_error(run_cli("extract", tmp_path / "nope", "--out", tmp_path / "f.h5"))
    assert str(tmp_path / "nope") in line and "does not exist" in line


def test_folder_without_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    line = one_line_error(run_cli("extract", tmp_path / "flat", "--out", tmp_path / "f.h5"))
    assert "no class folders" in line


def test_class_without_images(tmp_path):
    images = make_image_folder(tmp_path / "images", {"train": 2}, split_folders=False)
    (images / "empty_class").mkdir()
    line = one_line_error(run_cli("extract", images, "--out", tmp_path / "f.h5"))
    assert "empty_class" in line and "no images" in line
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("args, words", [
    (("--backbone", "alexnet9"), "unknown backbone 'alexnet9'"),
    (("--weights", "missing.pth"), "missing.pth does not exist"),
])
def test_bad_backbone_settings(tmp_path, args, words):
    images = make_image_folder(tmp_path / "images", {"train": 1, "val": 1})
    assert words in one_line_error(run_cli("extract", images, "--out", tmp_path / "f.h5", *args))


def test_train_on_missing_cache(tmp_path):
    line = one_line_error(run_cli("train", tmp_path / "none.h5", "--out", tmp_path / "m"))
    assert "does not exist" in line


def test_train_with_unknown_classifier(small_cache, tmp_path):
    line = one_line_error(run_cli("train", small_cache, "--classifier", "forest", "--out", tmp_path / "m"))
    assert "unknown classifier 'forest'" in line and "logreg" in line


def test_corrupt_cache_is_refused(small_cache, tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(small_cache.read_bytes()[:4096])
    assert "bad.h5" in one_line_error(run_cli("train", bad, "--out", tmp_path / "m"))
