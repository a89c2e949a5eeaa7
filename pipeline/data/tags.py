"""Multi-label intake: a labels file whose label column lists each image's labels ("shirt|bag"), so that a
sample's label is a tuple of class indices, maybe empty (an image showing none of the classes: a negative for
every one of them).

The split is seeded as for single-label data: each image goes with its rarest label (images without a label
form a group of their own), and each group is cut into test/val/train by `folders.stratified_split`.
Problems of the file, each said in one line:
  whitespace around a label, an empty label between separators   stripped, one warning
  a label repeated within a cell                                   kept once, one warning
  a label given to one image only                                  one warning (a typo of another?)
  a label found only in val or test                                an error: no head could learn it
  one image given two different label sets                         an error, as for single-label files
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.data.folders import (
    Dataset,
    Sample,
    _files,
    _in_split_order,
    _read_label_rows,
    _warn_singletons,
    stratified_split,
)
from pipeline.runtime.errors import InputError, warn

UNLABELLED = -1   # the stratum of the images without labels


def parse_cell(cell: str, separator: str) -> tuple[list[str], bool, bool]:
    """The labels of one cell in order of first appearance, whether any needed stripping (whitespace, an
    empty part) and whether any was repeated."""
    if not cell.strip():
        return [], False, False
    parts = cell.split(separator)
    labels = [p.strip() for p in parts]
    stripped = any(p != label or not label for p, label in zip(parts, labels))
    labels = [label for label in labels if label]
    unique = list(dict.fromkeys(labels))
    return unique, stripped, len(unique) < len(labels)


def scan_tags(root: Path, s) -> Dataset:
    """The images of labels file `s.labels` (a `folders.DatasetSettings` with `multi_label`) under `root`,
    each with the tuple of its class indices, split as the module says."""
    root, csv_path = Path(root), Path(s.labels)
    if not root.is_dir():
        raise InputError(f"data folder {root} does not exist")
    chosen, skipped = _rows(root, csv_path, s)
    if not chosen:
        raise InputError(f"no row of {csv_path} names an image in {root}")
    classes = sorted({label for _, labels in chosen.values() for label in labels})
    if len(classes) < 2:
        raise InputError(f"{csv_path} names {len(classes)} label{'s' * (len(classes) != 1)}; "
                        f"need at least two")
    _warn_singletons([label for _, labels in chosen.values() for label in labels], csv_path.name)
    index = {c: i for i, c in enumerate(classes)}
    tags = {path: tuple(sorted(index[label] for label in labels)) for path, (_, labels) in chosen.items()}
    counts = Counter(i for t in tags.values() for i in t)
    strata: dict[int, list[str]] = {}
    for path, t in tags.items():
        strata.setdefault(min(t, key=lambda i: (counts[i], i)) if t else UNLABELLED, []).append(path)
    cut = stratified_split(strata, s.val_fraction, s.test_fraction, s.seed)
    samples = _in_split_order([Sample(x.path, tags[x.path], x.split) for x in cut])
    _check_learnable(samples, classes)
    return Dataset(root, classes, samples, "labels-csv", skipped, multi_label=True)


def _rows(root: Path, csv_path: Path, s) -> tuple[dict[str, tuple[int, list[str]]], list[tuple[str, str]]]:
    """{image path: (line, labels)} of the rows naming an image, and the (path, reason) skipped."""
    rows = _read_label_rows(csv_path, s.id_column, s.label_column)
    if not rows:
        raise InputError(f"{csv_path} lists no images")
    found: list[tuple[str, str]] = []
    images = _files(root, root, found)
    skipped = [(p, r) for p, r in found if (root / p).resolve() != csv_path.resolve()]
    known, by_stem = set(images), {}
    for f in images:
        by_stem.setdefault(f.rsplit(".", 1)[0], []).append(f)
    name, chosen, stripped, repeated = csv_path.name, {}, [], []
    for line, id_, cell in rows:
        key = id_.replace("\\", "/").removeprefix("./")
        matches = [key] if key in known else by_stem.get(key, [])
        labels, was_stripped, was_repeated = parse_cell(cell, s.label_separator)
        stripped += [line] * was_stripped
        repeated += [line] * was_repeated
        if not id_:
            skipped.append((f"{name} line {line}", "no image id"))
        elif len(matches) != 1:
            skipped.append((id_, f"{name} line {line} lists it, but {root} has no such image" if not matches
                            else f"{name} line {line} is ambiguous: {', '.join(matches)}"))
        elif matches[0] in chosen:
            first, first_labels = chosen[matches[0]]
            if set(first_labels) != set(labels):
                raise InputError(f"{name} gives {matches[0]} two label sets: '{'|'.join(first_labels)}' "
                                f"(line {first}) and '{'|'.join(labels)}' (line {line})")
            skipped.append((matches[0], f"{name} line {line} repeats line {first}"))
        else:
            chosen[matches[0]] = (line, labels)
    _warn_lines(name, stripped, "whitespace or empty labels around a separator, stripped")
    _warn_lines(name, repeated, "a label repeated within the cell, kept once")
    skipped += [(f, f"not listed in {name}") for f in images if f not in chosen]
    return chosen, skipped


def _warn_lines(name: str, lines: list[int], what: str) -> None:
    if lines:
        shown = ", ".join(map(str, lines[:5])) + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")
        warn(f"{name}: {what}: line{'s' * (len(lines) > 1)} {shown}")


def _check_learnable(samples: list[Sample], classes: list[str]) -> None:
    """Refuse labels that no training image carries: a head could never learn them."""
    trained = {i for x in samples if x.split == "train" for i in x.label}
    unseen = [(c, sorted({x.split for x in samples if i in x.label})) for i, c in enumerate(classes)
              if i not in trained]
    if unseen:
        label, splits = unseen[0]
        more = f" (and {len(unseen) - 1} more labels)" if len(unseen) > 1 else ""
        raise InputError(f"label '{label}' appears only in {' and '.join(splits)}, never in train{more}; "
                        f"give it more images or fix the labels file")
