"""Dataset intake: find labelled images and assign splits.

Layouts:
  ROOT/{train,val[,test]}/CLASS/*   splits given by the folders; a missing val (and, with train
                                    alone, test) is cut from train as class folders are split
  ROOT/CLASS/*                      seeded stratified split into train/val/test
  ROOT/* + labels.csv               an id-or-path column and a label column (`scan(..., labels=CSV)`);
                                    seeded stratified split as for class folders

The unlabelled pool (split POOL, label -1): ROOT/unlabeled/ at any depth beside the split folders, or with
`pool=True` the rows of a labels file whose label is empty. With a pool, train may be missing or empty
(a cold start): the classes are the union of the labelled splits' class folders, a class without images is
a warning, and a class with fewer than MIN_TO_CUT training images is kept whole in train (no val cut).

Nothing is dropped silently: files that are not images, images the CSV does not list, CSV rows whose
image is missing, rows without a label and repeated rows are recorded in `Dataset.skipped` with the
reason. A repeated id with a *different* label is an error: the CSV contradicts itself.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.runtime.errors import InputError, warn
from pipeline.runtime.files import write_atomically
from pipeline.runtime.settings import setting

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


IGNORED_NAMES = {"thumbs.db", "desktop.ini"}


SPLITS = ("train", "val", "test")
POOL = "pool"                 # the unlabelled images: a group of the cache beside the splits
POOL_FOLDER = "unlabeled"     # ROOT/unlabeled/ holds them in the split-folder layout
MIN_TO_CUT = 5                # with a pool, a class with fewer training images gives none to val


@dataclass(frozen=True)
class Sample:
    path: str   # relative to the dataset root, with forward slashes
    label: int | tuple[int, ...]   # the class index; multi-label: the sorted indices of its tags (maybe none)
    split: str


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    samples: list[Sample]
    layout: str
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason) found while scanning
    multi_label: bool = False   # each sample's label is a tuple of class indices (pipeline.data.tags)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def splits(self) -> list[str]:
        """The labelled splits present."""
        present = {s.split for s in self.samples}
        return [s for s in SPLITS if s in present]

    def groups(self) -> list[str]:
        """The labelled splits present, then the pool if there is one: the groups of the cache."""
        return self.splits() + ([POOL] if self.split(POOL) else [])


@dataclass
class DatasetSettings:
    """How a data folder becomes labelled splits: shared by extract, finetune and bench."""
    labels: str | None = setting(None, "CSV with an image column and a label column; the images lie under "
                                        "the data folder.")
    id_column: str = setting("id", "Column of --labels naming each image: a path relative to the data folder, "
                                   "with or without extension.")
    label_column: str | None = setting(None, "Column of --labels holding the class; default: 'breed', "
                                             "else 'label'.")
    val_fraction: float = setting(0.15, "Share of each class cut out for val (from train when split folders "
                                        "have no val folder).", min=0, below=1)
    test_fraction: float = setting(0.15, "Share of each class cut out for test (none when there is a val or "
                                         "test folder).", min=0, below=1)
    seed: int = setting(0, "Seed of the split (and of whatever else the stage draws at random).")
    multi_label: bool = setting(False, "With --labels: each cell of the label column lists the image's labels "
                                       "(none: a negative for every class); the cache holds a 0/1 label matrix "
                                       "(docs/multilabel.md).")
    label_separator: str = setting("|", "What separates the labels of one cell with --multi-label.",
                                   check=lambda v: None if v and not v.isspace() else "must be a visible character")

    def check(self) -> None:
        if self.val_fraction + self.test_fraction >= 1:
            raise InputError(f"val_fraction + test_fraction must be below 1, got {self.val_fraction} + "
                            f"{self.test_fraction}")
        if self.multi_label and not self.labels:
            raise InputError("--multi-label needs a labels file (--labels labels.csv)")

    def scan(self, root: Path, pool: bool = False) -> Dataset:
        if self.multi_label:
            if pool:
                raise InputError("--pool does not combine with --multi-label: an empty cell is an image "
                                "without labels, a negative for every class")
            from pipeline.data.tags import scan_tags
            return _checked(scan_tags(root, self))
        return scan(root, self.val_fraction, self.test_fraction, self.seed, self.labels, self.id_column,
                    self.label_column, pool)


def _visible(name: str) -> bool:
    return not name.startswith(".") and name.lower() not in IGNORED_NAMES


def _class_dirs(folder: Path) -> list[Path]:
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p.name))
    for p in dirs:
        if not _utf8(p.name):
            raise InputError(f"folder {printable(str(p))}: its name is not valid UTF-8; rename it")
    return dirs


def _utf8(name: str) -> bool:
    """Whether a file name read from the file system is valid UTF-8 (else it holds surrogate escapes)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(path: str) -> str:
    """A path as it can be stored and shown: bytes that are not UTF-8 as \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def file_problem(path: Path) -> str | None:
    """Why a file found in a folder cannot be an image sample, or None. One rule for every command
    that walks a folder (extract, predict): such files are reported with this reason, never dropped."""
    if not path.exists():
        return "broken symbolic link"
    if not path.is_file():
        return "not a regular file"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file type ({path.suffix or 'no extension'})"
    if not _utf8(str(path)):
        return "file name is not valid UTF-8; rename it"
    return None


def _files(class_dir: Path, root: Path, skipped: list[tuple[str, str]]) -> list[str]:
    """Relative paths of candidate images; other files are recorded as skipped, never dropped.

    Symbolic links are followed once: a link to a folder already on the way down from `root`
    or already scanned (a loop) is recorded as skipped instead of being walked again."""
    chain = [class_dir, *class_dir.parents]
    seen = {_identity(d) for d in chain[:chain.index(root) + 1]}
    found: list[str] = []
    _walk(class_dir, root, seen, found, skipped)
    return sorted(found)


def _identity(folder: Path) -> tuple[int, int]:
    st = folder.stat()
    return st.st_dev, st.st_ino


def _walk(folder: Path, root: Path, seen: set, found: list[str], skipped: list[tuple[str, str]]) -> None:
    for p in sorted(folder.iterdir()):
        if not _visible(p.name):
            continue
        rel = p.relative_to(root).as_posix()
        if p.is_dir():
            if _identity(p) in seen:
                skipped.append((printable(rel), "link to a folder already scanned (a symlink loop); not followed"))
                continue
            seen.add(_identity(p))
            _walk(p, root, seen, found, skipped)
        elif problem := file_problem(p):
            skipped.append((printable(rel), problem))
        else:
            found.append(rel)


def find_images(inputs: list[Path]) -> list[tuple[Path, str | None]]:
    """Files as given and the files of folders (walked as `scan` walks a class folder), each with the
    reason it is skipped or None, in input order and sorted within a folder."""
    out: list[tuple[Path, str | None]] = []
    for p in map(Path, inputs):
        if p.is_dir():
            skipped: list[tuple[str, str]] = []
            found = [(p / f, None) for f in _files(p, p, skipped)]
            out += sorted(found + [(p / f, reason) for f, reason in skipped], key=lambda item: str(item[0]))
        elif p.exists() or p.is_symlink():
            out.append((p, None))
        else:
            raise InputError(f"{p} does not exist")
    return out


DEFAULT_LABEL_COLUMNS = ("breed", "label")


def scan(root: Path, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
         labels: Path | None = None, id_column: str = "id", label_column: str | None = None,
         pool: bool = False) -> Dataset:
    """Find the images under `root` and assign each a class and a split.

    With `labels` (a CSV file) the classes come from its `label_column` (default: 'breed', else
    'label') and each row names its image by `id_column`: a path relative to `root`, with or
    without the file extension; with `pool`, rows with an empty label go to the pool.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"data folder {root} does not exist")
    if not _utf8(str(root.resolve())):   # the cache records it as text
        raise InputError(f"data folder {printable(str(root.resolve()))}: its path is not valid UTF-8; rename it")
    if labels is not None:
        return _checked(_scan_labels(root, Path(labels), id_column, label_column, val_fraction,
                                     test_fraction, seed, pool))
    top = _class_dirs(root)
    skipped: list[tuple[str, str]] = []
    names = {p.name for p in top}
    if top and names <= {*SPLITS, POOL_FOLDER} and names & {"train", POOL_FOLDER}:
        pool_dir = root / POOL_FOLDER
        unlabelled = [Sample(f, -1, POOL) for f in _files(pool_dir, root, skipped)] if pool_dir.is_dir() else []
        classes = _split_classes(root, bool(unlabelled))
        samples = []
        for split in SPLITS:
            if not (root / split).is_dir():
                continue
            for class_dir in _class_dirs(root / split):
                samples += [Sample(f, classes.index(class_dir.name), split)
                            for f in _files(class_dir, root, skipped)]
        samples += unlabelled
        if not (root / "val").is_dir():
            samples = _split_train(root, classes, samples, val_fraction,
                                   0.0 if (root / "test").is_dir() else test_fraction, seed)
        layout = "split-folders"
    else:
        if not top:
            raise InputError(f"data folder {root} has no class folders (expected ROOT/CLASS/* "
                            f"or ROOT/train/CLASS/*, or pass --labels labels.csv)")
        classes = [p.name for p in top]
        per_class = {i: _files(d, root, skipped) for i, d in enumerate(top)}
        samples = stratified_split(per_class, val_fraction, test_fraction, seed)
        layout = "class-folders"
    return _checked(Dataset(root, classes, samples, layout, skipped))


def _split_classes(root: Path, pool: bool) -> list[str]:
    """The classes of the split-folder layout: train's class folders; with a pool, the union of every
    labelled split's (a cold start may have no train folder yet, or empty class folders)."""
    if not pool:
        if not (root / "train").is_dir():
            raise InputError(f"{root} has no train folder (and no {POOL_FOLDER} folder)")
        classes = [p.name for p in _class_dirs(root / "train")]
        if not classes:
            raise InputError(f"{root / 'train'} has no class folders")
        for split in SPLITS[1:]:
            for class_dir in _class_dirs(root / split) if (root / split).is_dir() else []:
                if class_dir.name not in classes:
                    raise InputError(f"class folder {class_dir} has no counterpart in {root / 'train'}")
        return classes
    return sorted({p.name for split in SPLITS if (root / split).is_dir() for p in _class_dirs(root / split)})


def _split_train(root: Path, classes: list[str], samples: list[Sample], val_fraction: float,
                 test_fraction: float, seed: int) -> list[Sample]:
    """Split folders without val: cut val (and test, by a nonzero `test_fraction`) out of train; nothing
    to cut (and no warning) when both fractions are 0 or train is empty."""
    per_class: dict[int, list[str]] = {i: [] for i in range(len(classes))}
    for s in samples:
        if s.split == "train":
            per_class[s.label].append(s.path)
    if not val_fraction and not test_fraction or not any(per_class.values()):
        return samples
    cut = "val and test" if test_fraction else "val"
    warn(f"{root} has no val folder; taking {cut} from train by a seeded stratified split "
         f"(val fraction {val_fraction:g}" + (f", test fraction {test_fraction:g}" if test_fraction else "") +
         "; see the manifest)")
    rest = [s for s in samples if s.split != "train"]
    return _in_split_order(rest + stratified_split(per_class, val_fraction, test_fraction, seed,
                                                   classes if any(s.split == POOL for s in rest) else None))


def _checked(dataset: Dataset) -> Dataset:
    """Every class has images and there are two classes at least; with a pool, only warnings (a cold start)."""
    pool = bool(dataset.split(POOL))
    for i, name in enumerate(dataset.classes):
        if not any(i in s.label if dataset.multi_label else s.label == i for s in dataset.samples):
            if not pool:
                raise InputError(f"class '{name}' in {dataset.root} has no images")
            warn(f"class '{name}' has no labelled image yet")
    if len(dataset.classes) < 2 and not pool:
        raise InputError(f"data folder {dataset.root} has only one class ('{dataset.classes[0]}'); "
                        f"need at least two")
    return dataset


def excluding(dataset: Dataset, exclude: Path) -> Dataset:
    """`dataset` without the images named in the `path` column of the CSV `exclude` (such as an edited copy of
    an audit report), each recorded as skipped with reason "excluded". Listed paths that are not among the
    images are one warning."""
    exclude = Path(exclude)
    with _csv_reader(exclude, "exclude list") as reader:
        columns = reader.fieldnames or []
        if "path" not in columns:
            raise InputError(f"{exclude} has no 'path' column (columns: {', '.join(columns) or 'none'})")
        listed = {(row["path"] or "").strip().replace("\\", "/").removeprefix("./") for row in reader} - {""}
    unknown = listed - {s.path for s in dataset.samples}
    if unknown:
        warn(f"{len(unknown)} paths of {exclude.name} are not among the images of {dataset.root}, "
             f"e.g. {printable(sorted(unknown)[0])}")
    kept = [s for s in dataset.samples if s.path not in listed]
    skipped = [*dataset.skipped, *((s.path, "excluded") for s in dataset.samples if s.path in listed)]
    return _checked(replace(dataset, samples=kept, skipped=skipped))


def _read_label_rows(path: Path, id_column: str, label_column: str | None) -> list[tuple[int, str, str]]:
    """(line number, id, label) of each row of a labels CSV."""
    with _csv_reader(path, "labels file") as reader:
        columns = reader.fieldnames or []
        if id_column not in columns:
            raise InputError(f"{path} has no column '{id_column}' (columns: {', '.join(columns) or 'none'}); "
                            f"name the image column with --id-column")
        if label_column is None:
            label_column = next((c for c in DEFAULT_LABEL_COLUMNS if c in columns), None)
            if label_column is None:
                raise InputError(f"{path} has neither a 'breed' nor a 'label' column (columns: "
                                f"{', '.join(columns)}); name the label column with --label-column")
        elif label_column not in columns:
            raise InputError(f"{path} has no column '{label_column}' (columns: {', '.join(columns)}); "
                            f"name the label column with --label-column")
        return [(reader.line_num, (row[id_column] or "").strip(), (row[label_column] or "").strip())
                for row in reader]


@contextmanager
def _csv_reader(path: Path, what: str):
    """A DictReader over the CSV file at `path`: a missing file, or text that is not UTF-8 or not CSV (also
    when found while its rows are read), is one error line."""
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield csv.DictReader(f, strict=True)   # an unterminated quote is an error, not one huge cell
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path} is not a readable CSV file: {exc}")


def _scan_labels(root: Path, csv_path: Path, id_column: str, label_column: str | None,
                 val_fraction: float, test_fraction: float, seed: int, pool: bool = False) -> Dataset:
    rows = _read_label_rows(csv_path, id_column, label_column)
    if not rows:
        raise InputError(f"{csv_path} lists no images")
    found: list[tuple[str, str]] = []
    images = _files(root, root, found)
    labels_file = csv_path.resolve()
    skipped = [(p, r) for p, r in found if (root / p).resolve() != labels_file]   # the CSV itself is no sample
    known = set(images)
    by_stem: dict[str, list[str]] = {}
    for f in images:
        by_stem.setdefault(f.rsplit(".", 1)[0], []).append(f)
    name = csv_path.name
    chosen: dict[str, tuple[int, str]] = {}   # image path -> (line, label)
    unlabelled: dict[str, int] = {}            # image path -> line, with `pool`
    for line, id_, label in rows:
        key = id_.replace("\\", "/").removeprefix("./")
        matches = [key] if key in known else by_stem.get(key, [])
        if not id_:
            skipped.append((f"{name} line {line}", "no image id"))
        elif not matches:
            skipped.append((id_, f"{name} line {line} lists it, but {root} has no such image"))
        elif len(matches) > 1:
            skipped.append((id_, f"{name} line {line} is ambiguous: {', '.join(matches)}"))
        elif not label and pool:
            unlabelled.setdefault(matches[0], line)
        elif not label:
            skipped.append((matches[0], f"{name} line {line} has no label"))
        elif matches[0] in chosen:
            first, first_label = chosen[matches[0]]
            if first_label != label:
                raise InputError(f"{name} gives {matches[0]} two labels: '{first_label}' (line {first}) "
                                f"and '{label}' (line {line})")
            skipped.append((matches[0], f"{name} line {line} repeats line {first}"))
        else:
            chosen[matches[0]] = (line, label)
    unlabelled = {f: line for f, line in unlabelled.items() if f not in chosen}   # a label elsewhere wins
    skipped += [(f, f"not listed in {name}") for f in images if f not in chosen and f not in unlabelled]
    if not chosen and not unlabelled:
        raise InputError(f"no row of {csv_path} names an image in {root}")
    classes = sorted({label for _, label in chosen.values()})
    _warn_singletons([label for _, label in chosen.values()], name)
    index = {c: i for i, c in enumerate(classes)}
    per_class: dict[int, list[str]] = {i: [] for i in index.values()}
    for path, (_, label) in chosen.items():
        per_class[index[label]].append(path)
    samples = stratified_split(per_class, val_fraction, test_fraction, seed, classes if unlabelled else None)
    samples += [Sample(f, -1, POOL) for f in sorted(unlabelled)]
    return Dataset(root, classes, samples, "labels-csv", skipped)


def _warn_singletons(labels: list[str], name: str) -> None:
    """A label given to one image only is often a typo of another label."""
    counts = {label: labels.count(label) for label in set(labels)}
    for label in sorted(c for c, n in counts.items() if n == 1):
        close = difflib.get_close_matches(label, [c for c, n in counts.items() if n > 1], n=1)
        warn(f"{name}: label '{label}' has a single image" + (f"; a typo of '{close[0]}'?" if close else ""))


def stratified_split(per_class: dict[int, list[str]], val_fraction: float, test_fraction: float,
                     seed: int, early: list[str] | None = None) -> list[Sample]:
    """Order each class by a seeded hash of the paths and cut it into test/val/train by the fractions.

    Unlike a shuffled list, the hash order of the existing images does not change when images are
    added or removed, so only images at the cuts can change split: a grown dataset keeps its test set.
    `early` (the class names, given while a pool is being labelled): a class with fewer than MIN_TO_CUT
    images is kept whole in train, said in one warning line."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InputError(f"split fractions must be in [0, 1) with val + test < 1, "
                        f"got val={val_fraction}, test={test_fraction}")
    few = [label for label, files in per_class.items() if early is not None and 0 < len(files) < MIN_TO_CUT]
    if few:
        warn(f"fewer than {MIN_TO_CUT} labelled images, all kept in train (none cut for val or test): "
             f"{', '.join(early[i] for i in few)}")
    samples = []
    for label, files in per_class.items():
        files = sorted(files, key=lambda f: hashlib.sha256(f"{seed}:{f}".encode()).digest())
        n_test, n_val = round(len(files) * test_fraction), round(len(files) * val_fraction)
        if label in few:
            n_test = n_val = 0
        cut = {"test": files[:n_test], "val": files[n_test:n_test + n_val], "train": files[n_test + n_val:]}
        samples += [Sample(f, label, split) for split, part in cut.items() for f in part]
    return _in_split_order(samples)


def _in_split_order(samples: list[Sample]) -> list[Sample]:
    """Train, val, test, then the pool, each by path: the order split folders are scanned in."""
    return sorted(samples, key=lambda s: ((*SPLITS, POOL).index(s.split), s.path))


def write_manifest(dataset: Dataset, path: Path) -> None:
    """The split made visible: one row per image (path, label, split), written whole or not at all."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path", "label", "split"])
    for s in dataset.samples:
        writer.writerow([s.path, label_text(dataset, s.label) if s.split != POOL else "", s.split])
    write_atomically(path, text.getvalue())


def label_text(dataset: Dataset, label) -> str:
    """A sample's label as the manifest writes it: the class name; multi-label: the tags joined by '|'."""
    return "|".join(dataset.classes[i] for i in label) if dataset.multi_label else dataset.classes[label]


def dataset_digest(rows) -> str:
    """Identity of a dataset as used: SHA-256 over its sorted (path, class name, split, image SHA-256)
    rows, so runs on different images, labels or splits are never compared with each other."""
    blob = json.dumps(sorted(map(list, rows)), separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
