"""Dataset intake: find labelled images, assign splits, decode images.

Layouts:
  ROOT/{train,val[,test]}/CLASS/*   splits given by the folders
  ROOT/CLASS/*                      seeded stratified split into train/val/test
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IGNORED_NAMES = {"thumbs.db", "desktop.ini"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: str   # relative to the dataset root, with forward slashes
    label: int
    split: str


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    samples: list[Sample]
    layout: str
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason) found while scanning

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def splits(self) -> list[str]:
        present = {s.split for s in self.samples}
        return [s for s in SPLITS if s in present]


def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name.lower() not in IGNORED_NAMES


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))


def _files(class_dir: Path, root: Path, skipped: list[tuple[str, str]]) -> list[str]:
    """Relative paths of candidate images; other files are recorded as skipped, never dropped."""
    found = []
    for p in sorted(class_dir.rglob("*")):
        if not p.is_file() or not _visible(p):
            continue
        rel = p.relative_to(root).as_posix()
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(rel)
        else:
            skipped.append((rel, f"not an image file type ({p.suffix or 'no extension'})"))
    return found


def scan(root: Path, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> Dataset:
    """Find the images under `root` and assign each a class and a split."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist")
    top = _class_dirs(root)
    skipped: list[tuple[str, str]] = []
    if top and {p.name for p in top} <= set(SPLITS) and (root / "train").is_dir():
        classes = [p.name for p in _class_dirs(root / "train")]
        if not classes:
            raise UserError(f"{root / 'train'} has no class folders")
        samples = []
        for split in SPLITS:
            if not (root / split).is_dir():
                continue
            for class_dir in _class_dirs(root / split):
                if class_dir.name not in classes:
                    raise UserError(f"class folder {class_dir} has no counterpart in {root / 'train'}")
                samples += [Sample(f, classes.index(class_dir.name), split)
                            for f in _files(class_dir, root, skipped)]
        layout = "split-folders"
    else:
        if not top:
            raise UserError(f"data folder {root} has no class folders (expected ROOT/CLASS/* "
                            f"or ROOT/train/CLASS/*)")
        classes = [p.name for p in top]
        per_class = {i: _files(d, root, skipped) for i, d in enumerate(top)}
        samples = stratified_split(per_class, val_fraction, test_fraction, seed)
        layout = "class-folders"
    for i, name in enumerate(classes):
        if not any(s.label == i for s in samples):
            raise UserError(f"class '{name}' in {root} has no images")
    if len(classes) < 2:
        raise UserError(f"data folder {root} has only one class ('{classes[0]}'); need at least two")
    return Dataset(root, classes, samples, layout, skipped)


def stratified_split(per_class: dict[int, list[str]], val_fraction: float, test_fraction: float,
                     seed: int) -> list[Sample]:
    """Shuffle each class with a fixed seed and cut it into train/val/test by the fractions."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"split fractions must be in [0, 1) with val + test < 1, "
                        f"got val={val_fraction}, test={test_fraction}")
    samples = []
    for label, files in per_class.items():
        files = sorted(files)
        random.Random(f"{seed}:{label}").shuffle(files)
        n_test, n_val = round(len(files) * test_fraction), round(len(files) * val_fraction)
        cut = {"test": files[:n_test], "val": files[n_test:n_test + n_val], "train": files[n_test + n_val:]}
        samples += [Sample(f, label, split) for split, part in cut.items() for f in part]
    return sorted(samples, key=lambda s: (SPLITS.index(s.split), s.path))


def write_manifest(dataset: Dataset, path: Path) -> None:
    """The split made visible: one row per image (path, label, split)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for s in dataset.samples:
            writer.writerow([s.path, dataset.classes[s.label], s.split])


def dataset_digest(rows) -> str:
    """Identity of a dataset as used: SHA-256 over its sorted (path, class name, split, image SHA-256)
    rows, so runs on different images, labels or splits are never compared with each other."""
    blob = json.dumps(sorted(map(list, rows)), separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class ImageError(Exception):
    """A file that cannot be used as an image; the message is the recorded reason."""


def read_image(path: Path) -> tuple[Image.Image, str]:
    """Decode one image as RGB; also return the SHA-256 of its bytes."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"unreadable: {exc.strerror or exc}")
    if not data:
        raise ImageError("empty file")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError("not a recognised image")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode: {exc}".splitlines()[0])
    return rgb, digest
