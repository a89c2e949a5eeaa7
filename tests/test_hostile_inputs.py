"""Hostile inputs through the real `pipeline extract`: one run over a folder full of bad files, then
targeted checks; and the folder, CSV and params.yaml problems that stop a run or warn."""
from __future__ import annotations

import io
import os
import re
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tests.conftest import COLOURS, cli_in_process, make_image_folder, stage_in_process, tiny_image
from tests.test_bad_input import one_line_error


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels but that holds no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def arrow(size: int = 64) -> Image.Image:
    """An image that looks different upside down: a white top half over a coloured bottom."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[: size // 2] = 255
    pixels[size // 2:, : size // 3] = (200, 30, 30)
    return Image.fromarray(pixels)


def jpeg_bytes(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=100, subsampling=0, **options)
    return buf.getvalue()


def hostile_folder(tmp: Path) -> Path:
    root = make_image_folder(tmp / "images", {"train": 4, "val": 2, "test": 2}, classes=("red", "green"))
    make_image_folder(tmp / "images", {"train": 4}, classes=("blue",))
    red, green = root / "train" / "red", root / "train" / "green"
    (red / "empty.jpg").write_bytes(b"")
    (red / "truncated.jpg").write_bytes(jpeg_bytes(tiny_image(COLOURS["red"], 99, 64))[:600])
    (red / "notes.jpg").write_text("this is not a picture\n")
    Image.new("P", (1, 1)).save(red / "pixel.gif")
    Image.new("RGB", (48, 48), (220, 40, 40)).save(red / "animated.gif", save_all=True,
                                                  append_images=[Image.new("RGB", (48, 48), (40, 60, 220))])
    Image.new("RGB", (48, 48), (220, 40, 40)).save(red / "first frame.png")
    Image.new("CMYK", (40, 40), (0, 200, 200, 20)).save(red / "cmyk.jpg")
    Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16)).save(red / "sixteen.png")
    Image.new("RGBA", (40, 40), (220, 40, 40, 120)).save(red / "rgba.png")
    tiny_image(COLOURS["red"], 98).convert("P").save(red / "palette.png")
    Image.new("RGB", (1, 1), (220, 40, 40)).save(red / "one.png")
    Image.new("RGB", (20_001, 200), (220, 40, 40)).save(red / "wide.png")
    Image.new("RGB", (20_001, 16), (220, 40, 40)).save(red / "sliver.png")
    (red / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    Image.new("1", (10_000, 10_000)).save(red / "quiet bomb.png")   # 1e8 pixels: only warned by Pillow
    upright = arrow()
    upright.save(red / "upright.png")
    upright.rotate(180).save(red / "upside down.png")
    exif = Image.Exif()
    exif[0x0112] = 3   # orientation: rotate 180 to view
    (red / "rotated.jpg").write_bytes(jpeg_bytes(upright.rotate(180), exif=exif))
    tiny_image(COLOURS["red"], 97).save(red / "café crème ü.png")
    tiny_image(COLOURS["red"], 96).save(red / os.fsdecode(b"caf\xe9 latin-1.png"))   # a name that is not UTF-8
    (red / "report.pdf").write_bytes(b"%PDF-1.4\n")
    os.mkfifo(red / "pipe.png")             # would block a reader forever
    (red / "zero.png").symlink_to("/dev/zero")   # would never end
    for name in (".hidden.png", "Thumbs.db", ".DS_Store"):
        (red / name).write_bytes(b"junk")
    outside = tmp / "outside"
    outside.mkdir()
    for i in range(2):
        tiny_image(COLOURS["green"], 90 + i).save(outside / f"o{i}.png")
    (green / "linked").symlink_to(outside)
    (green / "loop").symlink_to(root / "train")
    (green / "gone.png").symlink_to(tmp / "nowhere.png")
    (green / "alias.png").symlink_to(red / "train_0.png")
    (root / "test" / "green" / "leaked.png").write_bytes((green / "train_1.png").read_bytes())
    (root / "test" / "blue").mkdir()
    (root / "test" / "blue" / "broken.png").write_text("not a png")
    return root


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    root = hostile_folder(tmp)
    out = tmp / "features.h5"
    proc = cli_in_process("extract", root, "--out", out, "--image-size", 64, "--workers", 0, "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out, "r") as f:
        rows = {p.decode(): (split, f[split]["features"][i], f[split]["sha256"][i].decode())
                for split in ("train", "val", "test") if split in f for i, p in enumerate(f[split]["paths"][:])}
        skipped = {p.decode(): r.decode() for p, r in f["skipped"][:]}
    return root, rows, skipped, proc.stderr


@pytest.mark.parametrize("name, reason", [
    ("empty.jpg", "empty file"),
    ("truncated.jpg", "cannot decode"),
    ("notes.jpg", "not a recognised image"),
    ("sliver.png", "aspect ratio beyond 200:1"),
    ("bomb.png", "decompression bomb"),
    ("quiet bomb.png", "decompression bomb"),
    ("report.pdf", "not an image file type (.pdf)"),
    ("pipe.png", "not a regular file"),
    ("zero.png", "not a regular file"),
    ("caf\\xe9 latin-1.png", "file name is not valid UTF-8; rename it"),
])
def test_bad_files_are_skipped_with_their_reason(hostile_run, name, reason):
    _, rows, skipped, _ = hostile_run
    assert reason in skipped[f"train/red/{name}"]
    assert f"train/red/{name}" not in rows


@pytest.mark.parametrize("name", ["pixel.gif", "animated.gif", "cmyk.jpg", "sixteen.png", "rgba.png", "palette.png",
                                  "one.png", "wide.png", "rotated.jpg", "café crème ü.png"])
def test_odd_but_valid_images_are_extracted(hostile_run, name):
    _, rows, _, _ = hostile_run
    assert np.isfinite(rows[f"train/red/{name}"][1]).all()


def test_animated_gif_gives_its_first_frame(hostile_run):
    _, rows, _, _ = hostile_run
    np.testing.assert_allclose(rows["train/red/animated.gif"][1], rows["train/red/first frame.png"][1], atol=1e-5)


def test_exif_orientation_is_applied(hostile_run):
    _, rows, _, _ = hostile_run
    rotated, upright, flipped = (rows[f"train/red/{n}"][1] for n in ("rotated.jpg", "upright.png", "upside down.png"))
    assert np.linalg.norm(rotated - upright) < np.linalg.norm(rotated - flipped) / 3


def test_hidden_files_are_ignored_and_symlinks_followed_once(hostile_run):
    _, rows, skipped, _ = hostile_run
    listed = set(rows) | set(skipped)
    assert not any(n in p for p in listed for n in (".hidden.png", "Thumbs.db", ".DS_Store"))
    assert {"train/green/linked/o0.png", "train/green/linked/o1.png", "train/green/alias.png"} <= set(rows)
    assert "symlink loop" in skipped["train/green/loop"]
    assert not any(p.startswith("train/green/loop/") for p in listed)
    assert skipped["train/green/gone.png"] == "broken symbolic link"


def test_summary_counts_every_file_and_warnings_are_single_lines(hostile_run):
    root, rows, skipped, stderr = hostile_run
    extracted, n_skipped, found = map(int, re.search(r"extracted (\d+) \+ skipped (\d+) = found (\d+)", stderr).groups())
    assert (extracted, n_skipped) == (len(rows), len(skipped)) and extracted + n_skipped == found
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert "warning: class 'blue' has no usable image in val" in warnings
    assert "warning: class 'blue' has no usable image in test" in warnings
    digest = rows["test/green/leaked.png"][2]
    leak = [w for w in warnings if digest in w]
    assert len(leak) == 1 and "train and test" in leak[0] and "train/green/train_1.png" in leak[0]
    assert rows["train/green/train_1.png"][2] == digest


def test_one_class_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "images", {"train": 2}, classes=("red",), split_folders=False)
    line = one_line_error(cli_in_process("extract", root, "--out", tmp_path / "f.h5", "--workers", 0))
    assert "only one class ('red')" in line and not (tmp_path / "f.h5").exists()


def test_labels_csv_problems(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rows = ["id,label"]
    for i in range(12):
        label = ("cat", "dog")[i % 2]
        tiny_image(COLOURS[("red", "green")[i % 2]], i).save(root / f"{i}.png")
        rows.append(f"{i},{label}")
    tiny_image(COLOURS["blue"], 50).save(root / "typo.png")
    rows += ["typo,dgo", "3,dog", "ghost,cat"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "f.h5"
    proc = cli_in_process("extract", root, "--labels", tmp_path / "labels.csv", "--out", out, "--image-size", 64,
                   "--workers", 0)
    assert proc.returncode == 0, proc.stderr
    assert "warning: labels.csv: label 'dgo' has a single image; a typo of 'dog'?" in proc.stderr.splitlines()
    with h5py.File(out, "r") as f:
        skipped = {p.decode(): r.decode() for p, r in f["skipped"][:]}
    assert skipped["3.png"] == "labels.csv line 15 repeats line 5"
    assert "ghost" in skipped and "has no such image" in skipped["ghost"]
    (tmp_path / "bad.csv").write_text("file,label\n0,cat\n")
    line = one_line_error(cli_in_process("extract", root, "--labels", tmp_path / "bad.csv", "--out", out))
    assert "has no column 'id'" in line and "file, label" in line


@pytest.mark.parametrize("params, words", [
    ("extract:\n  batchsize: 8\n", ["extract.batchsize is not a setting", "batch_size", "image_size"]),
    ("extract:\n  batch_size: eight\n", ["extract.batch_size must be an integer or null", "'eight'"]),
    ("extract:\n  batch_size: 0\n", ["batch_size must be at least 1, got 0"]),
    ("extract:\n  backbone: resnet9000\n", ["extract.backbone 'resnet9000' is unknown", "resnet18", "timm/"]),
    ("extractors:\n  x: {image_size: big}\n", ["extractors.x.image_size must be an integer or null", "'big'"]),
    ("extractors:\n  y: {}\n", ["extractors has no 'x'; it has: y"]),
])
def test_bad_extract_params(tmp_path, params, words):
    (tmp_path / "params.yaml").write_text(params if "extractors" in params else params + "extractors:\n  x: {}\n")
    line = one_line_error(stage_in_process("extract.py", tmp_path, "x", tmp_path / "images", tmp_path / "f.h5"))
    assert all(w in line for w in words), line


def test_unknown_classifier_in_params(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  forest:\n    C: auto\n")
    line = one_line_error(stage_in_process("train.py", tmp_path, "forest", tmp_path / "features.h5", tmp_path / "m"))
    assert "params.yaml: train.forest: unknown classifier 'forest'" in line and "logreg" in line
