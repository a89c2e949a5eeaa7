"""Bad input: one clear line naming the path and the problem, exit code 2, no traceback."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli_in_process, make_image_folder


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_missing_data_folder(tmp_path):
    line = one_line_error(cli_in_process("extract", tmp_path / "nope", "--out", tmp_path / "f.h5"))
    assert str(tmp_path / "nope") in line and "does not exist" in line


def test_folder_without_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    line = one_line_error(cli_in_process("extract", tmp_path / "flat", "--out", tmp_path / "f.h5"))
    assert "no class folders" in line


def test_class_without_images(tmp_path):
    images = make_image_folder(tmp_path / "images", {"train": 2}, split_folders=False)
    (images / "empty_class").mkdir()
    line = one_line_error(cli_in_process("extract", images, "--out", tmp_path / "f.h5"))
    assert "empty_class" in line and "no images" in line
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("args, words", [
    (("--backbone", "alexnet9"), "--backbone 'alexnet9' is unknown"),
    (("--weights", "missing.pth"), "missing.pth does not exist"),
])
def test_bad_backbone_settings(tmp_path, args, words):
    images = make_image_folder(tmp_path / "images", {"train": 1, "val": 1})
    assert words in one_line_error(cli_in_process("extract", images, "--out", tmp_path / "f.h5", *args))


def test_train_on_missing_cache(tmp_path):
    line = one_line_error(cli_in_process("train", tmp_path / "none.h5", "--out", tmp_path / "m"))
    assert "does not exist" in line


@pytest.mark.parametrize("args", [["train", "none.h5"], ["audit", "none.h5"], ["predict", "no_model", "."],
                                  ["export", "no_model", "--out", "m.onnx"], ["visualize", "no_model", "."],
                                  ["extract", ".", "--backbone", "alexnet9"]])
def test_a_missing_cache_or_model_is_refused_before_torch_or_sklearn_load(tmp_path, args):
    """The answer comes at once: the seconds of importing torch and scikit-learn are not spent on it."""
    probe = ("import sys\nfrom pipeline.cli import main\ntry:\n    main()\nexcept SystemExit as exc:\n"
             "    print(exc.code, sorted({'torch', 'sklearn'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.stdout.split() == ["2", "[]"], proc.stdout + proc.stderr
    reasons = ("does not exist", "not a model directory", "'alexnet9' is unknown")
    assert "error: " in proc.stderr and any(reason in proc.stderr for reason in reasons)


def test_train_with_unknown_classifier(small_cache, tmp_path):
    line = one_line_error(cli_in_process("train", small_cache, "--classifier", "forest", "--out", tmp_path / "m"))
    assert "--classifier" in line and "'forest' is not one of" in line and "'torch_mlp'" in line


def test_corrupt_cache_is_refused(small_cache, tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(small_cache.read_bytes()[:4096])
    assert "bad.h5" in one_line_error(cli_in_process("train", bad, "--out", tmp_path / "m"))


@pytest.mark.parametrize("args, words", [
    (("extract", "{images}", "--out", "{tmp}/f.h5", "--batch-size", 0), "--batch-size must be at least 1, got 0"),
    (("extract", "{images}", "--out", "{tmp}/f.h5", "--image-size", -5), "--image-size must be at least 1, got -5"),
    (("finetune", "{images}", "--out", "{tmp}/ft", "--lr", -1), "--lr must be above 0, got -1"),
    (("train", "{cache}", "--out", "{tmp}/m", "--classifier", "torch_linear", "--param", "epochs=0"),
     "--param epochs must be at least 1, got 0"),
    (("train", "{cache}", "--out", "{tmp}/m", "--param", "C=-1"), "--param C must be above 0, got -1"),
    (("bench", "{images}", "--repeats", 0), "--repeats must be at least 1, got 0"),
    (("predict", "{tmp}/m", "{images}", "--top-k", 0), "--top-k must be at least 1, got 0"),
    (("extract", "{images}", "--out", "{tmp}/f.h5", "--backbone", "vgg16", "--weights", "none", "--image-size", 8),
     "backbone vgg16 cannot take 8x8 images (Given input size: (512x1x1)"),
])
def test_numbers_out_of_range_are_refused_before_any_work(small_cache, tmp_path, args, words):
    images = make_image_folder(tmp_path / "images", {"train": 2, "val": 1})
    fill = {"images": images, "cache": small_cache, "tmp": tmp_path}
    line = one_line_error(cli_in_process(*(str(a).format(**fill) for a in args)))
    assert words in line
    assert not {p.name for p in tmp_path.iterdir()} - {"images"}     # nothing written


def test_out_of_range_settings_of_stage_two_and_visualize(small_cache, tmp_path):
    from pipeline.heads.settings import train_settings
    from pipeline.heads.train import train
    from pipeline.models.visualize import visualize
    from pipeline.runtime.errors import InputError
    with pytest.raises(InputError, match="cv_folds must be at least 2, got 1"):
        train_settings("logreg", {"cv_folds": 1})
    with pytest.raises(InputError, match="dropout must be below 1, got 1.0"):
        train(small_cache, tmp_path / "m", train_settings("torch_mlp", {"weight_decay": 0.1, "dropout": 1.0}))
    with pytest.raises(InputError, match="gamma must be a positive number, 'scale' or 'auto'"):
        train(small_cache, tmp_path / "m", train_settings("rbf_svm", {"C": 1.0, "gamma": "huge"}))
    with pytest.raises(InputError, match="limit must be at least 1, got 0"):
        visualize(tmp_path / "m", [tmp_path], tmp_path / "visual", limit=0)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args, words", [
    (("extract", "{images}", "--out", "{tmp}/folder"), "--out {tmp}/folder is a folder; name the cache file"),
    (("extract", "{images}", "--out", "{tmp}/file/f.h5"), "{tmp}/file: File exists"),   # the system's refusal
    (("train", "{cache}", "--out", "{tmp}/file"), "--out {tmp}/file: {tmp}/file is a file, not a folder"),
    (("finetune", "{images}", "--out", "{tmp}/file/ft"), "--out {tmp}/file/ft: {tmp}/file is a file, not a folder"),
])
def test_an_output_path_that_cannot_be_written_is_one_line(small_cache, tmp_path, args, words):
    images = make_image_folder(tmp_path / "images", {"train": 2, "val": 1})
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("a file where a folder is needed")
    fill = {"images": images, "cache": small_cache, "tmp": tmp_path}
    line = one_line_error(cli_in_process(*(str(a).format(**fill) for a in args)))
    assert words.format(**fill) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder", "images"]
    assert not list((tmp_path / "folder").iterdir())


def test_a_folder_whose_training_images_are_all_unusable_leaves_the_previous_cache(small_cache, tmp_path):
    images = make_image_folder(tmp_path / "images", {"train": 2, "val": 1})
    for path in (images / "train").rglob("*.*"):
        path.write_bytes(b"\x89PNG but truncated")
    out = tmp_path / "f.h5"
    out.write_bytes(small_cache.read_bytes())
    line = one_line_error(cli_in_process("extract", images, "--out", out, "--image-size", 32, "--quiet"))
    assert line.startswith("error: no training image could be used (") and "train/" in line
    assert line.endswith(f"{out} is left as it was")
    assert out.read_bytes() == small_cache.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "images"]   # no .tmp, .lock or manifest


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("args", [
    ("extract", "{images}", "--out", "{tmp}/f.h5", "--device", "cuda"),
    ("train", "{cache}", "--classifier", "torch_linear", "--param", "device=cuda", "--out", "{tmp}/m"),
])
def test_cuda_without_a_gpu_is_the_same_error_everywhere(small_cache, tmp_path, args):
    images = make_image_folder(tmp_path / "images", {"train": 2, "val": 1})
    fill = {"images": images, "cache": small_cache, "tmp": tmp_path}
    line = one_line_error(cli_in_process(*(str(a).format(**fill) for a in args)))
    assert line == "error: device cuda was asked for, but torch sees no CUDA GPU"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]   # refused before writing anything
