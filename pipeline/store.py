"""The HDF5 feature cache: schema, fingerprint, atomic write, reads by split.

Layout (readable with plain h5py):
  /                 attrs: schema_version, classes (JSON), backbone, weights, weights_sha256, layer,
                           image_size, transform (JSON), dtype, versions (JSON), fingerprint,
                           created, tool_version, extract_seconds (the one-off extraction time)
  /<split>/features [N, D] float16|float32, chunked by rows
  /<split>/labels   [N] int64
  /<split>/paths    [N] utf-8 str, relative to the data root
  /<split>/sha256   [N] 64-char str of the image bytes
  /skipped          table of (path, reason)
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline import __version__
from pipeline.data import dataset_digest
from pipeline.errors import UserError

SCHEMA_VERSION = 1
FINGERPRINT_FIELDS = ("backbone", "weights_sha256", "layer", "transform", "dtype", "versions")
STR = h5py.string_dtype("utf-8")
SKIPPED_DTYPE = np.dtype([("path", STR), ("reason", STR)])


def fingerprint(attrs: dict) -> str:
    """Digest of everything that determines a feature vector."""
    blob = json.dumps({k: attrs[k] for k in FINGERPRINT_FIELDS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def library_versions() -> dict:
    import PIL
    import timm
    import torch
    import torchvision
    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "pillow": PIL.__version__}


def cache_attrs(spec: dict, classes: list[str], dtype: str) -> dict:
    """The root attributes for a cache made with backbone `spec` (Backbone.spec())."""
    attrs = {"backbone": spec["backbone"], "weights": spec["weights"], "weights_sha256": spec["weights_sha256"],
             "layer": spec["layer"], "image_size": spec["preprocessing"]["image_size"],
             "transform": json.dumps(spec["preprocessing"], sort_keys=True), "dtype": dtype,
             "versions": json.dumps(library_versions(), sort_keys=True)}
    attrs["fingerprint"] = fingerprint(attrs)
    attrs.update(schema_version=SCHEMA_VERSION, classes=json.dumps(classes),
                 created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), tool_version=__version__)
    return attrs


class FeatureWriter:
    """Streams rows into `<target>.tmp` and renames it over the target only in `commit()`."""

    def __init__(self, target: Path, attrs: dict, dim: int, dtype: str):
        self.target = Path(target)
        self.tmp = self.target.with_name(self.target.name + ".tmp")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.tmp, "w")
        self.file.attrs.update(attrs)
        self.dim, self.dtype = dim, np.dtype(dtype)
        self.skipped: list[tuple[str, str]] = []

    def _group(self, split: str) -> h5py.Group:
        if split in self.file:
            return self.file[split]
        g = self.file.create_group(split)
        rows = max(1, min(1024, (1 << 20) // (self.dim * self.dtype.itemsize)))
        g.create_dataset("features", (0, self.dim), self.dtype, maxshape=(None, self.dim), chunks=(rows, self.dim))
        g.create_dataset("labels", (0,), np.int64, maxshape=(None,), chunks=(4096,))
        g.create_dataset("paths", (0,), STR, maxshape=(None,), chunks=(4096,))
        g.create_dataset("sha256", (0,), "S64", maxshape=(None,), chunks=(4096,))
        return g

    def append(self, split: str, features: np.ndarray, labels, paths, sha256) -> None:
        g = self._group(split)
        n, k = g["labels"].shape[0], len(labels)
        for name, rows in (("features", features.astype(self.dtype)), ("labels", np.asarray(labels, np.int64)),
                           ("paths", list(paths)), ("sha256", np.array(sha256, "S64"))):
            g[name].resize(n + k, axis=0)
            g[name][n:] = rows

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append((path, reason))

    def commit(self, **attrs) -> None:
        """Finish the file, adding `attrs` known only at the end (such as the extraction time)."""
        self.file.attrs.update(attrs)
        self.file.create_dataset("skipped", data=np.array(self.skipped, dtype=SKIPPED_DTYPE))
        self.file.flush()
        os.fsync(self.file.id.get_vfd_handle())
        self.file.close()
        os.replace(self.tmp, self.target)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class Split:
    features: np.ndarray   # float32 [N, D]
    labels: np.ndarray
    paths: list[str]
    sha256: list[str]


@dataclass
class Cache:
    path: Path
    attrs: dict
    classes: list[str]
    splits: list[str]
    skipped: list[tuple[str, str]]

    def read(self, split: str) -> Split:
        with h5py.File(self.path, "r") as f:
            g = f[split]
            return Split(g["features"][:].astype(np.float32), g["labels"][:],
                         [p.decode() for p in g["paths"][:]], [s.decode() for s in g["sha256"][:]])

    def dataset_id(self) -> str:
        """data.dataset_digest of the images the cache holds, without reading their features."""
        rows = []
        with h5py.File(self.path, "r") as f:
            for split in self.splits:
                g = f[split]
                rows += [(p.decode(), self.classes[label], split, digest.decode())
                         for p, label, digest in zip(g["paths"][:], g["labels"][:], g["sha256"][:])]
        return dataset_digest(rows)


def open_cache(path: Path) -> Cache:
    """Open a feature cache after checking it is whole: schema, datasets, row counts, fingerprint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"feature cache {path} does not exist; run `pipeline extract` first")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"feature cache {path} is not a readable HDF5 file ({exc})")
    with f:
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        missing = [k for k in (*FINGERPRINT_FIELDS, "fingerprint", "classes", "schema_version") if k not in attrs]
        if missing:
            raise UserError(f"feature cache {path} lacks attributes {missing}")
        if attrs["schema_version"] != SCHEMA_VERSION:
            raise UserError(f"feature cache {path} has schema version {attrs['schema_version']}, "
                            f"this tool reads {SCHEMA_VERSION}; re-run `pipeline extract`")
        if fingerprint(attrs) != attrs["fingerprint"]:
            raise UserError(f"feature cache {path}: fingerprint does not match its attributes")
        splits = [s for s in ("train", "val", "test") if s in f]
        for s in splits:
            names = ("features", "labels", "paths", "sha256")
            absent = [n for n in names if n not in f[s]]
            if absent:
                raise UserError(f"feature cache {path}: split '{s}' lacks datasets {absent}")
            counts = {n: f[s][n].shape[0] for n in names}
            if len(set(counts.values())) != 1:
                raise UserError(f"feature cache {path}: split '{s}' row counts disagree {counts}")
        if "train" not in splits:
            raise UserError(f"feature cache {path} has no train split")
        skipped = [(p.decode() if isinstance(p, bytes) else p, r.decode() if isinstance(r, bytes) else r)
                   for p, r in f["skipped"][:]] if "skipped" in f else []
    return Cache(path, attrs, json.loads(attrs["classes"]), splits, skipped)
