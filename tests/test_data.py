"""Dataset intake: the three layouts, the seeded split, and decoding every format and mode to RGB."""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.folders import scan, write_manifest
from pipeline.data.images import MAX_FILE_BYTES, ImageError, batches_within, read_image
from pipeline.runtime.errors import InputError
from pipeline.storage.cache import open_cache
from tests.conftest import COLOURS, cli_in_process, make_image_folder, tiny_image


def test_split_folders_give_the_splits(image_folder: Path):
    ds = scan(image_folder)
    assert ds.layout == "split-folders"
    assert ds.classes == sorted(COLOURS)
    assert Counter(s.split for s in ds.samples) == {"train": 24, "val": 12, "test": 12}
    assert all(s.path.startswith(f"{s.split}/{ds.classes[s.label]}/") for s in ds.samples)


@pytest.mark.parametrize("folders, expected", [
    ({"train": 20, "test": 4}, {"train": 17, "val": 3, "test": 4}),     # val cut from train, test kept
    ({"train": 20}, {"train": 14, "val": 3, "test": 3})])               # val and test cut from train
def test_split_folders_without_val_cut_it_from_train(tmp_path: Path, capsys, folders, expected):
    root = make_image_folder(tmp_path / "images", folders)
    ds = scan(root, val_fraction=0.15, test_fraction=0.15, seed=0)
    assert ds.layout == "split-folders"
    per_class = Counter((ds.classes[s.label], s.split) for s in ds.samples)
    assert all(per_class[(c, split)] == n for c in ds.classes for split, n in expected.items())
    assert all(s.path.startswith(f"{s.split}/") for s in ds.samples if s.split == "test" and "test" in folders)
    assert all(s.path.startswith("train/") for s in ds.samples if s.split == "val")
    assert scan(root, 0.15, 0.15, seed=0).samples == ds.samples
    assert "has no val folder" in capsys.readouterr().err
    untouched = scan(root, val_fraction=0, test_fraction=0, seed=0)      # asked for no cut: none, no warning
    assert {s.split for s in untouched.samples} == set(folders)
    assert capsys.readouterr().err == ""


def test_class_folders_split_is_stratified_seeded_and_recorded(tmp_path: Path):
    root = make_image_folder(tmp_path / "images", {"all": 20}, split_folders=False)
    ds = scan(root, val_fraction=0.15, test_fraction=0.25, seed=3)
    assert ds.layout == "class-folders"
    per_class = Counter((ds.classes[s.label], s.split) for s in ds.samples)
    assert all(per_class[(c, "train")] == 12 and per_class[(c, "val")] == 3 and per_class[(c, "test")] == 5
               for c in ds.classes)
    assert scan(root, 0.15, 0.25, seed=3).samples == ds.samples
    assert scan(root, 0.15, 0.25, seed=4).samples != ds.samples

    write_manifest(ds, tmp_path / "manifest.csv")
    with open(tmp_path / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["path"], r["label"], r["split"]) for r in rows] == \
        [(s.path, ds.classes[s.label], s.split) for s in ds.samples]


def _flat_folder(root: Path, n: int = 6) -> dict[str, str]:
    """Images named by id directly in `root`, mixed formats and extension cases; returns {id: class}."""
    root.mkdir(parents=True)
    labels = {}
    for i in range(n):
        for k, (name, colour) in enumerate(COLOURS.items()):
            image_id = f"{name[0]}{i:03d}"
            tiny_image(colour, 10 * i + k).save(root / f"{image_id}{['.jpg', '.PNG', '.Jpeg'][i % 3]}")
            labels[image_id] = name
    return labels


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_labels_csv_layout_records_every_row_it_cannot_use(tmp_path: Path):
    root = tmp_path / "train"
    labels = _flat_folder(root)
    (root / "notes.txt").write_text("not an image")
    tiny_image(COLOURS["red"], 99).save(root / "unlisted.png")
    rows = [[image_id, breed] for image_id, breed in labels.items()]
    rows += [["r000", "red"], ["ghost", "red"], ["g001", ""], ["", "blue"]]
    csv_path = _write_csv(root / "labels.csv", ["id", "breed"], rows)   # the CSV may sit among the images

    ds = scan(root, labels=csv_path, seed=0)
    assert ds.layout == "labels-csv"
    assert ds.classes == sorted(COLOURS)
    assert {Path(s.path).stem: ds.classes[s.label] for s in ds.samples} == labels   # one sample per id
    assert len(ds.samples) == len(labels)
    reasons = dict(ds.skipped)
    assert reasons["notes.txt"].startswith("not an image file type")
    assert reasons["unlisted.png"] == "not listed in labels.csv"
    assert "no such image" in reasons["ghost"]
    assert "repeats line 2" in reasons["r000.jpg"]
    assert "has no label" in reasons["g001.PNG"]
    assert "no image id" in [r for p, r in ds.skipped if p.startswith("labels.csv line")][0]
    assert "labels.csv" not in {p for p, _ in ds.skipped}
    assert Counter(s.split for s in ds.samples if ds.classes[s.label] == "blue") == {"train": 4, "val": 1, "test": 1}


def test_labels_csv_with_path_column_and_label_default(tmp_path: Path):
    root = make_image_folder(tmp_path / "images", {"all": 4}, split_folders=False)
    rows = [[p.relative_to(root).as_posix(), p.parent.name.upper()] for p in sorted(root.rglob("*.png"))]
    csv_path = _write_csv(tmp_path / "files.csv", ["file", "label"], rows)
    ds = scan(root, labels=csv_path, id_column="file")
    assert ds.classes == sorted(c.upper() for c in COLOURS)
    assert all(Path(s.path).parent.name.upper() == ds.classes[s.label] for s in ds.samples)
    assert len(ds.samples) == 12 and not ds.skipped


@pytest.mark.parametrize("header, options, message", [
    (["image", "breed"], {}, "has no column 'id'"),
    (["id", "kind"], {}, "neither a 'breed' nor a 'label' column"),
    (["id", "breed"], {"label_column": "species"}, "has no column 'species'"),
])
def test_labels_csv_missing_column_is_one_clear_error(tmp_path: Path, header, options, message):
    root = tmp_path / "train"
    labels = _flat_folder(root, 2)
    csv_path = _write_csv(tmp_path / "labels.csv", header, [[k, v] for k, v in labels.items()])
    with pytest.raises(InputError, match=message):
        scan(root, labels=csv_path, **options)


def test_labels_csv_contradicting_itself_is_an_error(tmp_path: Path):
    root = tmp_path / "train"
    labels = _flat_folder(root, 2)
    rows = [[k, v] for k, v in labels.items()] + [["r000.jpg", "blue"]]
    with pytest.raises(InputError, match=r"two labels: 'red' \(line 2\) and 'blue'"):
        scan(root, labels=_write_csv(tmp_path / "labels.csv", ["id", "breed"], rows))


def test_extract_command_reads_a_labels_csv(tmp_path: Path):
    root = tmp_path / "train"
    labels = _flat_folder(root, 4)
    csv_path = _write_csv(tmp_path / "labels.csv", ["id", "breed"], [[k, v] for k, v in labels.items()])
    out = tmp_path / "features.h5"
    cli_in_process("extract", root, "--labels", csv_path, "--out", out, "--image-size", 64, "--workers", 0, check=True)
    cache = open_cache(out)
    assert cache.classes == sorted(COLOURS)
    read = [cache.read(s) for s in cache.splits]
    assert sum(len(r.labels) for r in read) == len(labels)
    assert all(cache.classes[y] == labels[Path(p).stem] for r in read for y, p in zip(r.labels, r.paths))
    manifest = out.with_suffix(".manifest.csv").read_text().splitlines()
    assert manifest[0] == "path,label,split" and len(manifest) == len(labels) + 1


# ---- decoding: every format and mode ends as 8-bit RGB with the colours a viewer shows ----

def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _rgb(colour) -> Image.Image:
    return Image.new("RGB", (64, 64), colour)


def _gif_two_frames(path: Path) -> Path:
    first, second = _rgb((250, 0, 0)).convert("P"), _rgb((0, 0, 250)).convert("P")
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    return path


def _rgba(path: Path) -> Path:
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))          # fully transparent black ...
    img.paste((0, 200, 0, 255), (0, 0, 32, 64))              # ... with an opaque green left half
    return _save(img, path)


def _sixteen_bit(path: Path) -> Path:
    return _save(Image.fromarray(np.full((64, 64), 32896, np.uint16)), path)   # 32896 / 257 = 128


CASES = {
    # name: (make(path), file name, expected colour at the centre-left, tolerance)
    "jpeg": (lambda p: _save(_rgb((200, 40, 40)), p, quality=95), "a.jpg", (200, 40, 40), 6),
    "jpeg-upper": (lambda p: _save(_rgb((200, 40, 40)), p, format="JPEG"), "a.JPEG", (200, 40, 40), 6),
    "png": (lambda p: _save(_rgb((10, 120, 230)), p), "a.png", (10, 120, 230), 0),
    "bmp": (lambda p: _save(_rgb((10, 120, 230)), p), "a.Bmp", (10, 120, 230), 0),
    "gif-first-frame": (_gif_two_frames, "a.gif", (250, 0, 0), 10),
    "webp": (lambda p: _save(_rgb((10, 120, 230)), p, lossless=True), "a.webp", (10, 120, 230), 0),
    "tiff": (lambda p: _save(_rgb((10, 120, 230)), p), "a.tif", (10, 120, 230), 0),
    "grayscale": (lambda p: _save(Image.new("L", (64, 64), 77), p), "a.png", (77, 77, 77), 0),
    "bilevel": (lambda p: _save(Image.new("1", (64, 64), 1), p), "a.bmp", (255, 255, 255), 0),
    "palette": (lambda p: _save(_rgb((10, 120, 230)).convert("P", palette=Image.Palette.ADAPTIVE), p),
                "a.png", (10, 120, 230), 0),
    "rgba-on-white": (_rgba, "a.png", (0, 200, 0), 0),
    "cmyk-jpeg": (lambda p: _save(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), p, quality=95),
                  "a.jpg", (255, 0, 0), 6),
    "cmyk-tiff": (lambda p: _save(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), p), "a.tiff", (255, 0, 0), 0),
    "16-bit-png": (_sixteen_bit, "a.png", (128, 128, 128), 0),
    "16-bit-tiff": (_sixteen_bit, "a.TIF", (128, 128, 128), 0),
    "float-tiff": (lambda p: _save(Image.fromarray(np.full((64, 64), 0.25, np.float32)), p), "a.tiff",
                   (64, 64, 64), 0),
}


@pytest.mark.parametrize("case", CASES)
def test_every_format_and_mode_decodes_to_rgb(tmp_path: Path, case: str):
    make, name, expected, tolerance = CASES[case]
    path = make(tmp_path / name)
    img, digest = read_image(path)
    assert img.mode == "RGB" and img.size == (64, 64)
    assert np.abs(np.array(img.getpixel((8, 32)), int) - expected).max() <= tolerance
    assert len(digest) == 64


def test_transparent_pixels_become_white(tmp_path: Path):
    img, _ = read_image(_rgba(tmp_path / "a.png"))
    assert img.getpixel((60, 32)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6                                   # rotate 90 degrees to display
    Image.new("RGB", (40, 20), (0, 0, 255)).save(tmp_path / "a.jpg", exif=exif)
    assert read_image(tmp_path / "a.jpg")[0].size == (20, 40)


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"hello", "not a recognised image")])
def test_unusable_files_give_their_reason(tmp_path: Path, content: bytes, reason: str):
    (tmp_path / "a.jpg").write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        read_image(tmp_path / "a.jpg")


def test_only_regular_files_of_bounded_size_are_read(tmp_path: Path):
    """A FIFO swapped in for an image after the scan, a device and an oversized file are refused at
    once, unread: a reader would block, never end, or fill the memory."""
    os.mkfifo(tmp_path / "a.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)   # sparse: no disk used
    for name, reason in (("a.png", "a FIFO, not a regular file"), ("zero.png", "a character device, not a regular file"),
                         ("huge.png", f"{MAX_FILE_BYTES + 1} bytes, more than the limit of {MAX_FILE_BYTES}")):
        with pytest.raises(ImageError) as refused:
            read_image(tmp_path / name)
        assert str(refused.value) == f"unreadable: {reason}"


def test_a_class_or_data_folder_whose_name_is_not_utf8_is_named_in_one_error(tmp_path: Path):
    root = make_image_folder(tmp_path / "images", {"train": 2}, split_folders=False)
    (root / "red").rename(root / os.fsdecode(b"r\xe9d"))
    with pytest.raises(InputError, match=r"r\\xe9d: its name is not valid UTF-8; rename it"):
        scan(root)
    (root / os.fsdecode(b"r\xe9d")).rename(root / "red")
    renamed = root.rename(tmp_path / os.fsdecode(b"im\xe1ges"))
    with pytest.raises(InputError, match=r"im\\xe1ges: its path is not valid UTF-8; rename it"):
        scan(renamed)


def test_truncated_image_gives_its_reason(tmp_path: Path):
    buffer = io.BytesIO()
    tiny_image((1, 2, 3), 0, 64).save(buffer, format="PNG")
    (tmp_path / "a.png").write_bytes(buffer.getvalue()[:200])
    with pytest.raises(ImageError, match="cannot decode"):
        read_image(tmp_path / "a.png")


def test_every_format_is_found_whatever_the_case_of_its_extension(tmp_path: Path):
    for i, (case, (make, name, _, _)) in enumerate(CASES.items()):
        folder = tmp_path / "images" / ("warm" if i % 2 else "cool")
        folder.mkdir(parents=True, exist_ok=True)
        make(folder / f"{case}{Path(name).suffix}")
    ds = scan(tmp_path / "images", 0, 0)
    assert len(ds.samples) == len(CASES) and not ds.skipped
    assert all(read_image(ds.root / s.path)[0].mode == "RGB" for s in ds.samples)


def test_class_folder_split_survives_new_images(tmp_path: Path):
    """Adding an image to each class moves at most the images at the two cuts of that class."""
    root = make_image_folder(tmp_path / "images", {"all": 40}, split_folders=False)
    before = {s.path: s.split for s in scan(root, seed=0).samples}
    for name, colour in COLOURS.items():
        tiny_image(colour, 500).save(root / name / "new.png")
    after = {s.path: s.split for s in scan(root, seed=0).samples}
    moved = [p for p in before if after[p] != before[p]]
    assert len(after) == len(before) + 3
    assert len(moved) <= 2 * len(COLOURS)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_close_to_the_full_decode(tmp_path: Path):
    from pipeline.features.backbones import IMAGENET_MEAN, IMAGENET_STD
    from pipeline.features.spec import Preprocessing
    exif = Image.Exif()
    exif[0x0112] = 6                                   # rotate 90 degrees to display
    photo = tiny_image((200, 60, 30), 1, size=1024).resize((1200, 800))
    photo.save(tmp_path / "big.jpg", quality=90, exif=exif)
    photo.save(tmp_path / "big.png")
    full, digest = read_image(tmp_path / "big.jpg")
    reduced, same_digest = read_image(tmp_path / "big.jpg", shortest=100)
    assert full.size == (800, 1200) and reduced.size == (200, 300) and digest == same_digest   # 1/4, upright
    assert read_image(tmp_path / "big.jpg", shortest=150)[0].size == (400, 600)    # 1/2: short side >= 300
    assert read_image(tmp_path / "big.jpg", shortest=250)[0].size == (800, 1200)   # less than 4x larger
    assert read_image(tmp_path / "big.png", shortest=100)[0].size == (1200, 800)   # not a JPEG (no EXIF)
    to_tensor = Preprocessing(96, 100, "bilinear", IMAGENET_MEAN, IMAGENET_STD).transform(normalise=False)
    difference = (to_tensor(full) - to_tensor(reduced)).abs()
    assert difference.mean() < 0.02, float(difference.mean())


def test_batches_are_cut_at_split_ends():
    """One loader serves every split: its batches keep the batch size within a split and never cross an end."""
    assert batches_within(7, 3, [4, 4, 7]) == [[0, 1, 2], [3], [4, 5, 6]]
    assert batches_within(5, 2) == [[0, 1], [2, 3], [4]]
    assert batches_within(0, 16, [0, 0]) == []
