"""The HDF5 feature cache: schema, fingerprint, atomic write, reads by split.

Layout (readable with plain h5py):
  /                 attrs: schema_version, classes (JSON), backbone, weights, weights_sha256, layer,
                           layers (JSON), image_size, transform (JSON), tta, dtype, versions (JSON),
                           compute_stats, stats (JSON, only with compute_stats), fingerprint,
                           created, tool_version, extract_seconds (the one-off extraction time),
                           data_root (absolute path of the image folder; not in the fingerprint),
                           digests (JSON: SHA-256 of each dataset), checksum (SHA-256 of the other attributes)
  /<split>/features [N, D] float16|float32, chunked by rows: the vectors of `layer` (= layers[0])
  /<split>/features@<layer>  [N, D'] the same rows for each further layer in `layers`
  /<split>/labels   [N] int64 class indices; in a multi-label cache (root attribute multi_label true, schema 5)
                    [N, classes] uint8, 1 where the image carries the class (a row of zeros: none of them)
  /<split>/paths    [N] utf-8 str, relative to the data root
  /<split>/sha256   [N] 64-char str of the image bytes: the key for incremental reuse
  /pool/...         the unlabelled images (data.folders.POOL), as a split without labels: features (and
                    features@<layer>), paths, sha256. With a pool, train may be absent (a cold start)
                    and the class list shorter than two.
  /skipped          table of (path, reason)

While being written, `<out>.tmp` also carries `plan` (digest of the samples to write) and
`progress` (how far each split got) so an interrupted run can continue; both go on commit.

A reader that knows nothing of extra layers reads `/<split>/features` as before. `transform`
holds the resize, crop and normalisation; with `compute_stats` its mean/std are those of the
training split (also in `stats`). `tta` is true when each vector is the mean of the image's and
its horizontal flip's. The fingerprint digests every attribute that changes a vector.

Integrity: features, labels and sha256 carry HDF5's Fletcher-32 filter (the library checks each chunk
it reads; HDF5 filters cannot cover the variable-length paths and skipped, the digests do), `digests`
and `checksum` are checked on every read, and the values too (finite features, labels within the
classes, consistent shapes). Caches of schema 2, written before these checks existed, are
refused with a request to re-run extract (which recomputes them rather than reusing their vectors).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline import __version__
from pipeline.data.folders import POOL, SPLITS, dataset_digest
from pipeline.runtime.errors import InputError
from pipeline.runtime.files import check_replaceable, fresh_file
from pipeline.runtime.reading import Field, checked, parsed
from pipeline.storage.records import LAYERS, PREPROCESSING

SCHEMA_VERSION = 5   # 2: several layers (layers, features@<layer>), tta, compute_stats; 3: checksums; 4: pool;
                     # 5: multi-label caches (attribute multi_label, labels [N, classes])
READABLE = (3, 4, 5)  # a cache of schema 3 is one of 4 without a pool, one of 4 is one of 5 with single labels
FINGERPRINT_FIELDS = ("backbone", "weights_sha256", "layer", "layers", "transform", "tta", "dtype", "versions",
                      "compute")
# compute (JSON: the forward pass's precision, and inputs 'PIL' or 'tensor', decoded and resized as tensors) is
# absent from caches written before it was recorded, and from those written without a backbone run: a cache
# without it is read, and its vectors are never reused by a run that records it
OPTIONAL = ("compute",)
EXPECTABLE = ("backbone", "weights", "weights_sha256", "layer", "layers", "image_size", "tta", "dtype",
              "compute_stats", "fingerprint")
STR = h5py.string_dtype("utf-8")
SKIPPED_DTYPE = np.dtype([("path", STR), ("reason", STR)])
# Rows go to the file within each write call, so a failed write (disk full) raises there; with a
# chunk cache it would fail later, when h5py closes a dataset, where errors are only printed.
UNBUFFERED = {"rdcc_nbytes": 0}
# HDF5 verifies each chunk's Fletcher-32 checksum whenever it is read: a flipped bit fails the read. HDF5
# allows no filter on variable-length strings (paths, skipped); the digests recorded at commit cover those.
CHECKED = {"fletcher32": True}


def fingerprint(attrs: dict) -> str:
    """Digest of everything that determines a feature vector."""
    blob = json.dumps(fingerprinted(attrs), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def fingerprinted(attrs: dict) -> dict:
    """The attributes the fingerprint digests, as model.json also keeps them to tie a head to its backbone."""
    return {k: attrs[k] for k in FINGERPRINT_FIELDS if k in attrs or k not in OPTIONAL}


def check_trained_on(fields, spec, recorded: str, where: str) -> None:
    """Refuse a model whose backbone `spec` (from model.json, at `where`) is not the one behind the cache
    it was trained on: `fields` (`fingerprinted`) must give the `recorded` fingerprint and name the same
    backbone, weights, layer, preprocessing and TTA as `spec`."""
    if not isinstance(fields, dict) or not {k for k in FINGERPRINT_FIELDS if k not in OPTIONAL} <= set(fields) \
            or not set(fields) <= set(FINGERPRINT_FIELDS):
        raise InputError(f"{where} does not record the feature cache its head was trained on ('cache'); "
                        f"train it again")
    if fingerprint(fields) != recorded:
        raise InputError(f"{where}: 'cache' does not give the recorded fingerprint (edited); train it again")
    try:
        transform = json.loads(fields["transform"])   # garbage reads as a mismatch below
    except (TypeError, ValueError):
        transform = None
    trained = (fields["backbone"], fields["weights_sha256"], fields["layer"], bool(fields["tta"]), transform)
    if trained != (spec.name, spec.weights_sha256, spec.layer, bool(spec.tta), spec.preprocessing.to_dict()):
        raise InputError(f"{where}: the backbone {spec.name} (weights SHA-256 {spec.weights_sha256[:12]}) is not "
                        f"the one the head was trained on ({fields['backbone']}, "
                        f"{str(fields['weights_sha256'])[:12]}); refusing to predict with it")


def library_versions() -> dict:
    import PIL
    import timm
    import torch
    import torchvision
    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "pillow": PIL.__version__}


def cache_attrs(spec, classes: list[str], dtype: str, stats: dict | None = None,
                data_root: Path | None = None, compute: dict | None = None, multi_label: bool = False) -> dict:
    """The root attributes for a cache made with backbone `spec` (a features.spec.BackboneSpec, which
    writes its own attributes); `stats` are
    the training split's channel statistics when they replaced the backbone's normalisation.
    `data_root`, the image folder the paths are relative to, is recorded outside the fingerprint:
    the same images moved elsewhere give the same vectors. `compute`: how the vectors were computed.
    `multi_label`: labels are stored as a 0/1 matrix; like the classes, outside the fingerprint."""
    attrs = {**spec.to_attrs(), "dtype": dtype, "versions": json.dumps(library_versions(), sort_keys=True),
             **({"compute": json.dumps(compute, sort_keys=True)} if compute else {})}
    attrs["fingerprint"] = fingerprint(attrs)
    attrs.update(schema_version=SCHEMA_VERSION, classes=json.dumps(classes), compute_stats=stats is not None,
                 multi_label=bool(multi_label),
                 created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), tool_version=__version__)
    if stats is not None:
        attrs["stats"] = json.dumps(stats)
    if data_root is not None:
        attrs["data_root"] = str(Path(data_root).resolve())
    return attrs


def features_name(layer: str, layers: list[str]) -> str:
    """Dataset name of a layer's vectors within a split group."""
    return "features" if layer == layers[0] else f"features@{layer}"


def _unpacked(value):
    """A JSON-valued attribute as the value it encodes; others as they are."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)   # only compared with what is expected; not JSON stays text
        except json.JSONDecodeError:
            pass
    return value


def _text(value) -> str:
    """A value as the command line writes it: true/false, comma-separated lists."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(_text, value))
    return str(value)


def differences(recorded: dict, wanted: dict, prefix: str = "") -> list[str]:
    """'field: recorded != wanted' for each field of `wanted` that differs; JSON fields by key.
    Values compare as text, so wanted values may come straight from the command line."""
    out = []
    for key, want in wanted.items():
        have, want = _unpacked(recorded.get(key)), _unpacked(want)
        if isinstance(have, dict) and isinstance(want, dict):
            out += differences(have, want, f"{prefix}{key}.")
            continue
        have, want = _text(have), _text(want)
        if key in ("fingerprint", "weights_sha256") and len(want) >= 8:   # a prefix will do
            have = have[:len(want)]
        if have != want:
            out.append(f"{prefix}{key}: {have} != {want}")
    return out


def check_expected(cache: "Cache", expected: dict) -> None:
    """Refuse a cache made other than as expected, naming each differing field."""
    unknown = [k for k in expected if k not in EXPECTABLE]
    if unknown:
        raise InputError(f"cannot expect '{unknown[0]}' of a feature cache; choose from {', '.join(EXPECTABLE)}")
    diffs = differences(cache.attrs, expected)
    if diffs:
        raise InputError(f"feature cache {cache.path} was made otherwise than expected "
                        f"(cache != expected): {'; '.join(diffs)}")


class FeatureWriter:
    """Streams rows into `<target>.tmp` and renames it over the target only in `commit()`.

    `checkpoint()` flushes the file and records in its `progress` attribute how far each split
    got; a later writer with the same fingerprint and `plan` (attrs) continues from there
    (`progress` then holds the samples done per split), so a killed run loses at most a batch.
    A kill during the flush itself can leave the file unreadable; the next run then starts over."""

    def __init__(self, target: Path, attrs: dict, dims: dict[str, int], dtype: str):
        """`dims`: the feature size of each layer, the default layer first."""
        self.target = Path(target)
        self.tmp = self.target.with_name(self.target.name + ".tmp")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.dims, self.dtype = dims, np.dtype(dtype)
        self.progress: dict[str, int] = {}   # samples done per split at the last checkpoint
        self.kept = 0                          # rows written at the last checkpoint
        self.file = self._resumed(attrs)
        if self.file is None:
            fresh_file(self.tmp)   # created anew below, never through a link planted at its name
        try:
            if self.file is None:
                self.file = h5py.File(self.tmp, "x", **UNBUFFERED)
                self.file.attrs.update(attrs)
                self.file.create_dataset("skipped", (0,), SKIPPED_DTYPE, maxshape=(None,), chunks=(1024,))
            self.flush()   # a readable file from the start, cut back to the last checkpoint on resume
        except BaseException:   # a full disk, say: no file is left behind
            self.abort()
            raise
        self.skipped: list[tuple[str, str]] = [(_str(p), _str(r)) for p, r in self.file["skipped"][:]]

    def _resumed(self, attrs: dict) -> h5py.File | None:
        """The checkpointed temporary file of an interrupted run with the same plan, cut back to its
        last checkpoint; None when there is none to continue."""
        try:
            if not stat.S_ISREG(os.lstat(self.tmp).st_mode):   # a link or FIFO is never opened
                return None
            f = h5py.File(self.tmp, "r+", **UNBUFFERED)
        except OSError:   # none, or not readable: start afresh
            return None
        try:
            if not all(f.attrs.get(k) == attrs[k] for k in ("fingerprint", "plan")) or "progress" not in f.attrs:
                raise ValueError("another plan")
            progress = json.loads(f.attrs["progress"])   # this tool's checkpoint; damage starts afresh below
            for split in (*SPLITS, POOL):   # rows written after the checkpoint go, even a new split's
                kept = progress["rows"].get(split, 0)
                if split in f and not kept:   # made after the checkpoint, perhaps cut short between its datasets
                    del f[split]
                for dataset in (f[split].values() if split in f else ()):
                    dataset.resize(kept, axis=0)
            f["skipped"].resize(progress["skipped"], axis=0)
        except (OSError, KeyError, ValueError, TypeError, AttributeError):
            f.close()
            return None
        self.progress, self.kept = progress["samples"], sum(progress["rows"].values())
        return f

    def _group(self, split: str) -> h5py.Group:
        if split in self.file:
            return self.file[split]
        g = self.file.create_group(split)
        for layer, dim in self.dims.items():
            rows = max(1, min(1024, (1 << 20) // (dim * self.dtype.itemsize)))
            g.create_dataset(features_name(layer, list(self.dims)), (0, dim), self.dtype, maxshape=(None, dim),
                             chunks=(rows, dim), **CHECKED)
        if split != POOL and self.file.attrs.get("multi_label", False):
            width = len(json.loads(self.file.attrs["classes"]))   # this writer's own attribute, set above
            g.create_dataset("labels", (0, width), np.uint8, maxshape=(None, width), chunks=(4096, width), **CHECKED)
        elif split != POOL:
            g.create_dataset("labels", (0,), np.int64, maxshape=(None,), chunks=(4096,), **CHECKED)
        g.create_dataset("paths", (0,), STR, maxshape=(None,), chunks=(4096,))
        g.create_dataset("sha256", (0,), "S64", maxshape=(None,), chunks=(4096,), **CHECKED)
        return g

    def append(self, split: str, features: dict[str, np.ndarray], labels, paths, sha256) -> None:
        """Rows of one split: `features` maps each layer to its [k, D] vectors (`labels` are not stored for
        the pool; in a multi-label cache each label is a tuple of class indices, or already a 0/1 row)."""
        g = self._group(split)
        n, k = g["sha256"].shape[0], len(sha256)
        columns = [(features_name(layer, list(self.dims)), features[layer].astype(self.dtype)) for layer in self.dims]
        if split != POOL and g["labels"].ndim == 2:
            columns.append(("labels", label_matrix(labels, g["labels"].shape[1])))
        elif split != POOL:
            columns.append(("labels", np.asarray(labels, np.int64)))
        for name, rows in (*columns, ("paths", list(paths)), ("sha256", np.array(sha256, "S64"))):
            g[name].resize(n + k, axis=0)
            g[name][n:] = rows

    def flush(self) -> None:
        """Flush to disk. HDF5 reports a failed write while flushing (a full disk) as a RuntimeError that
        names the errno; it is raised as the OSError it is."""
        try:
            self.file.flush()
        except RuntimeError as exc:
            code = re.search(r"errno = (\d+)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(self.tmp)) from exc

    def rows(self, split: str) -> int:
        return self.file[split]["sha256"].shape[0] if split in self.file else 0

    def skip(self, rows: list[tuple[str, str]]) -> None:
        """Record skipped files as (path, reason) rows, all in one write."""
        if not rows:
            return
        table = self.file["skipped"]
        table.resize(len(self.skipped) + len(rows), axis=0)
        table[len(self.skipped):] = np.array(rows, SKIPPED_DTYPE)
        self.skipped += rows

    def checkpoint(self, split: str, samples_done: int) -> None:
        """Make everything written so far durable and resumable: `samples_done` of `split` are in."""
        self.progress[split] = samples_done
        rows = {s: self.rows(s) for s in (*SPLITS, POOL) if s in self.file}
        self.file.attrs["progress"] = json.dumps({"samples": self.progress, "rows": rows,
                                                  "skipped": len(self.skipped)})
        self.flush()
        self.kept = sum(rows.values())

    def commit(self, **attrs) -> None:
        """Finish the file, adding `attrs` known only at the end (such as the extraction time), the
        digest of every dataset and the checksum of all attributes (checked on every read)."""
        for key in ("progress", "plan"):
            self.file.attrs.pop(key, None)
        self.file.attrs.update(attrs)
        seal(self.file)
        self.flush()
        os.fsync(self.file.id.get_vfd_handle())
        self.file.close()
        os.replace(self.tmp, self.target)

    def close(self) -> None:
        """Stop, keeping the temporary file at its last checkpoint for a later run to continue."""
        self.file.close()

    def abort(self) -> None:
        try:
            if getattr(self, "file", None) is not None:
                self.file.close()
        except (OSError, RuntimeError):   # closing flushes, which fails again on a full disk; the file goes anyway
            pass
        self.tmp.unlink(missing_ok=True)


def label_matrix(labels, n_classes: int) -> np.ndarray:
    """[k, n_classes] uint8 of `labels`: tuples of class indices, or rows that already are 0/1."""
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        return labels.astype(np.uint8)
    out = np.zeros((len(labels), n_classes), np.uint8)
    for row, tags in enumerate(labels):
        out[row, list(tags)] = 1
    return out


def is_feature_cache(path: Path) -> bool:
    """Whether the regular file at `path` is an HDF5 file written by this tool (it has a fingerprint)."""
    try:
        if not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r") as f:
            return "fingerprint" in f.attrs and "schema_version" in f.attrs
    except OSError:
        return False


def check_output(out: Path, force: bool = False) -> None:
    """Refuse an --out that is a folder, a device or FIFO, or an existing file that is not a feature cache
    (a CSV, a photo: replacing it would lose it) unless `force`. Nothing is written here."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; name the cache file, e.g. {out / 'features.h5'}")
    check_replaceable(out, "--out")
    if out.exists() and not force and not is_feature_cache(out):
        raise InputError(f"--out {out} exists and is not a feature cache; refusing to replace it "
                        f"(name another file, or pass --force)")


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def column_digest(column: h5py.Dataset | np.ndarray, block_bytes: int = 1 << 24,
                  visit: Callable[[int, np.ndarray], None] | None = None) -> str:
    """SHA-256 of a column's type, shape and values: numbers as raw bytes, read about 16 MB at a time so
    memory stays flat (`visit(first_row, block)` sees each block); strings and tables by the repr of their
    values. Equal for a dataset and the array read from it."""
    digest = hashlib.sha256(f"{column.dtype.str}{column.shape}".encode())
    if column.dtype.kind in "biufS":
        rows = max(1, block_bytes // max(1, column.dtype.itemsize * int(np.prod(column.shape[1:]))))
        for a in range(0, max(len(column), 1), rows):
            block = np.ascontiguousarray(column[a:a + rows])
            digest.update(block.tobytes())
            if visit is not None:
                visit(a, block)
    else:
        digest.update(repr(column[:].tolist()).encode())
    return digest.hexdigest()


def seal(f: h5py.File) -> None:
    """Record the digest of every dataset (`digests`) and then the checksum of all attributes (`checksum`)."""
    digests: dict[str, str] = {}

    def add(name: str, item) -> None:   # visititems stops at the first callback that returns a value
        if isinstance(item, h5py.Dataset):
            digests[name] = column_digest(item)
    f.visititems(add)
    f.attrs["digests"] = json.dumps(digests, sort_keys=True)
    f.attrs["checksum"] = attrs_checksum(f.attrs)


def verify_sealed(f: h5py.File, path: Path) -> None:
    """Check every dataset of a sealed file against its recorded digest, block by block (flat memory)."""
    digests = json.loads(f.attrs["digests"])   # a shard this run wrote and sealed
    names: list[str] = []
    f.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
    for name in sorted(set(names) | set(digests)):
        if name not in names or column_digest(f[name]) != digests.get(name):
            raise InputError(f"{path}: {name} does not match the digest recorded when it was written "
                            f"(damaged or edited)")


def attrs_checksum(attrs) -> str:
    """SHA-256 of every root attribute but the checksum itself: the fingerprint leaves out the classes,
    the digests and the provenance."""
    plain = {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Split:
    features: np.ndarray   # float32 [N, D]
    labels: np.ndarray     # [N] class indices; multi-label: [N, classes] 0/1 (uint8)
    paths: list[str]
    sha256: list[str]


@dataclass
class Cache:
    """A checked feature cache, open until `close()` (or the end of a `with` block). Every read goes
    through this one open file, so a cache that `extract` puts at `path` meanwhile is never mixed in,
    and every column read is checked against the digest recorded when the cache was committed."""
    path: Path
    file: h5py.File
    attrs: dict
    classes: list[str]
    splits: list[str]
    skipped: list[tuple[str, str]]

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    @property
    def data_root(self) -> str | None:
        """The image folder the paths are relative to; None for caches written before it was recorded."""
        return self.attrs.get("data_root")

    @property
    def layers(self) -> list[str]:
        return json.loads(self.attrs["layers"])   # checked by _checked

    @property
    def has_pool(self) -> bool:
        return POOL in self.file

    @property
    def multi_label(self) -> bool:
        """Whether each image carries a set of classes: `read(split).labels` is then [N, classes] 0/1."""
        return bool(self.attrs.get("multi_label", False))

    def label_matrix(self, split: str) -> np.ndarray:
        """[N, classes] 0/1 (uint8) of a split: the stored matrix, or one-hot single labels."""
        labels = self.column(split, "labels")
        self._check_labels(split, labels)
        return labels if labels.ndim == 2 else np.eye(len(self.classes), dtype=np.uint8)[labels]

    def column(self, split: str, name: str) -> np.ndarray:
        """One dataset of a split, verified (HDF5's Fletcher-32 per chunk, then the recorded digest)."""
        def whole(dataset):
            values = dataset[:]
            return values, column_digest(values)
        return self._verified(split, name, whole)

    def _verified(self, split: str, name: str, read: Callable[[h5py.Dataset], tuple]):
        """The value of `read(dataset)` -> (value, digest of the dataset), refused with one error line
        when HDF5 cannot read it (Fletcher-32 included) or the digest is not the one recorded."""
        try:
            value, digest = read(self.file[split][name])
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise InputError(f"feature cache {self.path}: {split}/{name} cannot be read, the file is damaged "
                            f"({str(exc).splitlines()[0]}); re-run `pipeline extract`")
        if digest != json.loads(self.attrs["digests"]).get(f"{split}/{name}"):   # checked by _checked
            raise InputError(f"feature cache {self.path}: {split}/{name} does not match the digest recorded "
                            f"when it was written (damaged or edited); re-run `pipeline extract`")
        return value

    def read(self, split: str, layer: str | None = None) -> Split:
        """One split's rows, or the pool's (labels -1); `layer` picks a further feature set (default: the first
        layer's). Refuses features that are not finite and labels outside the class list."""
        if layer is not None and layer not in self.layers:
            raise InputError(f"feature cache {self.path} has no features of layer '{layer}'; "
                            f"it has {', '.join(self.layers)}")
        features = self.column(split, features_name(layer or self.layers[0], self.layers)).astype(np.float32)
        paths = [p.decode() for p in self.column(split, "paths")]
        labels = np.full(len(paths), -1) if split == POOL else self.column(split, "labels")
        bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
        if len(bad):
            raise InputError(f"feature cache {self.path}: {len(bad)} rows of {split} hold features that are not "
                            f"finite (NaN or inf), e.g. {paths[bad[0]]}; re-run `pipeline extract`")
        if split != POOL:
            self._check_labels(split, labels)
        return Split(features, labels, paths, [s.decode() for s in self.column(split, "sha256")])

    def _check_labels(self, split: str, labels: np.ndarray) -> None:
        if labels.ndim == 2:
            if labels.shape[1] != len(self.classes) or labels.max(initial=0) > 1:
                raise InputError(f"feature cache {self.path}: {split}/labels must be 0/1 with one column per class "
                                f"({len(self.classes)}), is {list(labels.shape)} up to {labels.max()}")
            return
        outside = labels[(labels < 0) | (labels >= len(self.classes))]
        if len(outside):
            raise InputError(f"feature cache {self.path}: {split} has labels outside its {len(self.classes)} "
                            f"classes (e.g. {outside[0]})")

    def finite_rows(self, split: str, name: str) -> np.ndarray:
        """Which rows of a split's feature dataset are finite, read block by block (flat memory) and
        verified on the way as `column` verifies."""
        def blockwise(dataset):
            finite = np.empty(len(dataset), bool)

            def check(first: int, block: np.ndarray) -> None:
                finite[first:first + len(block)] = np.isfinite(block.astype(np.float32)).all(axis=1)
            return finite, column_digest(dataset, visit=check)
        return self._verified(split, name, blockwise)

    def dataset_id(self) -> str:
        """data.dataset_digest of the images the cache holds, without reading their features."""
        rows = []
        for split in self.splits:
            labels = self.column(split, "labels")
            self._check_labels(split, labels)
            rows += [(p.decode(), self._label_name(label), split, digest.decode()) for p, label, digest
                     in zip(self.column(split, "paths"), labels, self.column(split, "sha256"))]
        return dataset_digest(rows)

    def _label_name(self, label) -> str:
        """The class name; multi-label: the names of the row's classes joined by '|'."""
        if np.ndim(label):
            return "|".join(c for c, on in zip(self.classes, label) if on)
        return self.classes[label]


class StoredVectors:
    """The vectors of an open cache by image digest, for reuse: the digests are indexed once, the vectors
    are read batch by batch when asked for, so memory does not grow with the cache. A row whose vector
    (in any layer) is not finite is left out, so it is computed again."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.where: dict[str, tuple[str, int]] = {}
        for split in cache.splits + ([POOL] if cache.has_pool else []):   # pool vectors serve images labelled since
            finite = np.logical_and.reduce([cache.finite_rows(split, features_name(layer, cache.layers))
                                            for layer in cache.layers])
            digests = cache.column(split, "sha256")
            for i in np.flatnonzero(finite):
                self.where.setdefault(digests[i].decode(), (split, int(i)))

    def read(self, digests: list[str]) -> dict[str, np.ndarray]:
        """Each layer's vectors of `digests` (all held here), in their order."""
        places = [self.where[d] for d in digests]
        out = {}
        for layer in self.cache.layers:
            name = features_name(layer, self.cache.layers)
            out[layer] = np.empty((len(digests), self.cache.file[places[0][0]][name].shape[1]), np.float32)
            for split in {s for s, _ in places}:
                mine = [k for k, (s, _) in enumerate(places) if s == split]
                rows, back = np.unique([places[k][1] for k in mine], return_inverse=True)  # h5py reads rows in order
                try:
                    out[layer][mine] = self.cache.file[split][name][rows][back]
                except (OSError, RuntimeError) as exc:
                    raise InputError(f"feature cache {self.cache.path}: {split}/{name} cannot be read, the file "
                                    f"is damaged ({str(exc).splitlines()[0]}); delete it and run again")
        return out

    def close(self) -> None:
        self.cache.close()


def content_warnings(cache: Cache, show: int = 20) -> list[str]:
    """What a user should know about a finished cache: classes without rows in a split (the class
    list comes from train) and byte-identical images in two splits (a leak between them)."""
    out, where = [], {}
    for split in cache.splits:
        labels = cache.column(split, "labels")
        cache._check_labels(split, labels)
        counts = labels.sum(0) if labels.ndim == 2 else np.bincount(labels, minlength=len(cache.classes))
        out += [f"class '{c}' has no usable image in {split}" for c, n in zip(cache.classes, counts) if n == 0]
        for path, digest in zip(cache.column(split, "paths"), cache.column(split, "sha256")):
            where.setdefault(digest.decode(), {}).setdefault(split, path.decode())
    leaks = [(d, s) for d, s in where.items() if len(s) > 1]
    out += [f"identical images in {' and '.join(s)} (sha256 {d}): {', '.join(s.values())}" for d, s in leaks[:show]]
    if len(leaks) > show:
        out.append(f"... and {len(leaks) - show} more images identical across splits")
    return out


def open_cache(path: Path) -> Cache:
    """Open a feature cache after checking it is whole: schema, checksums of its attributes, fingerprint,
    class list, datasets with their Fletcher-32 filter, types, shapes and row counts. The data itself is
    checked as it is read (`Cache.column`). Close it after use (or use it in a `with` block)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"feature cache {path} does not exist; run `pipeline extract` first")
    check_replaceable(path, "feature cache")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"feature cache {path} is not a readable HDF5 file ({exc})")
    try:
        return _checked(path, f)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        f.close()
        raise InputError(f"feature cache {path} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                        f"re-run `pipeline extract`")
    except InputError:
        f.close()
        raise


def _check_columns(path: Path, group: h5py.Group, s: str, matrix_width: int | None) -> None:
    """A split's labels (a matrix `matrix_width` wide in a multi-label cache), paths and sha256 are of their
    types and shapes."""
    for n, kind in (("labels", "iu"), ("paths", "O"), ("sha256", "S"))[s == POOL:]:
        matrix = n == "labels" and matrix_width is not None
        if matrix and (group[n].shape[1:] != (matrix_width,) or group[n].dtype.kind not in kind):
            raise InputError(f"feature cache {path}: {s}/labels must be a 0/1 matrix with one column per "
                            f"class, is {group[n].dtype} {list(group[n].shape)}")
        if not matrix and (group[n].ndim != 1 or group[n].dtype.kind not in kind):
            raise InputError(f"feature cache {path}: {s}/{n} must be one column of "
                            f"{'integers' if n == 'labels' else 'text'}, is {group[n].dtype} {list(group[n].shape)}")


def _checked(path: Path, f: h5py.File) -> Cache:
    attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    version = attrs.get("schema_version")
    if version not in READABLE:
        before = " (written before caches carried checksums)" if isinstance(version, int) and version < 3 else ""
        raise InputError(f"feature cache {path} has schema version {version}{before}, this tool reads "
                        f"{' and '.join(map(str, READABLE))}; re-run `pipeline extract`")
    required = [k for k in FINGERPRINT_FIELDS if k not in OPTIONAL]
    missing = [k for k in (*required, "fingerprint", "classes", "digests", "checksum") if k not in attrs]
    if missing:
        raise InputError(f"feature cache {path} lacks attributes {missing}")
    if fingerprint(attrs) != attrs["fingerprint"]:
        raise InputError(f"feature cache {path}: fingerprint does not match its attributes")
    if attrs_checksum(attrs) != attrs["checksum"]:
        raise InputError(f"feature cache {path}: its attributes do not match their checksum (damaged or edited); "
                        f"re-run `pipeline extract`")
    where = f"feature cache {path}: attribute"
    checked(parsed(attrs["transform"], Field(dict), f"{where} transform"), PREPROCESSING, f"{where} transform")
    parsed(attrs["digests"], Field(dict, items=Field(str)), f"{where} digests")
    parsed(attrs["layers"], LAYERS, f"{where} layers")
    classes = json.loads(attrs["classes"])   # checked by _checked
    pool = POOL in f
    if (not isinstance(classes, list) or len(classes) < (0 if pool else 2) or len(set(map(str, classes))) != len(classes)
            or not all(isinstance(c, str) and c for c in classes)):
        raise InputError(f"feature cache {path}: attribute classes must be a list of at least two distinct "
                        f"names, got {str(attrs['classes'])[:80]}")
    splits = [s for s in SPLITS if s in f]
    if "train" not in splits and not pool:
        raise InputError(f"feature cache {path} has no train split")
    layers = json.loads(attrs["layers"])   # checked by _checked
    widths: dict[str, int] = {}
    for s in splits + ([POOL] if pool else []):
        features = [features_name(layer, layers) for layer in layers]
        names = (*features, *["labels"] * (s != POOL), "paths", "sha256")
        absent = [n for n in names if n not in f[s]]
        if absent:
            raise InputError(f"feature cache {path}: split '{s}' lacks datasets {absent}")
        unchecked = [n for n in names if n != "paths" and not f[s][n].fletcher32]
        if unchecked:
            raise InputError(f"feature cache {path}: split '{s}' datasets {unchecked} carry no checksums")
        for n in features:
            ds = f[s][n]
            if ds.ndim != 2 or ds.dtype.kind != "f" or widths.setdefault(n, ds.shape[1]) != ds.shape[1]:
                raise InputError(f"feature cache {path}: {s}/{n} must be [rows, {widths.get(n, 'D')}] floats, "
                                f"is {list(ds.shape)} {ds.dtype}")
        _check_columns(path, f[s], s, len(classes) if attrs.get("multi_label", False) else None)
        counts = {n: f[s][n].shape[0] for n in names}
        if len(set(counts.values())) != 1:
            raise InputError(f"feature cache {path}: split '{s}' row counts disagree {counts}")
        if not counts["sha256"]:
            raise InputError(f"feature cache {path}: split '{s}' has no rows")
    rows = sum(f[s]["sha256"].shape[0] for s in splits + ([POOL] if pool else []))
    if len(classes) > rows:   # more class names than images, labelled or pooled, is damage, not data
        raise InputError(f"feature cache {path} lists {len(classes):,} classes but holds {rows:,} images "
                        f"(damaged or edited); re-run `pipeline extract`")
    skipped = [(_str(p), _str(r)) for p, r in f["skipped"][:]] if "skipped" in f else []
    return Cache(path, f, attrs, classes, splits, skipped)
