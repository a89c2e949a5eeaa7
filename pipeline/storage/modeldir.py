"""The files of a trained model directory: self-describing, holding arrays and JSON only (no pickle),
written to a temporary sibling folder and renamed into place when complete.

  model.json     kind, classes, backbone spec, cache fingerprint, preprocessing, SHA-256 of each file
  head.safetensors  kind "features": the fitted preprocessing + classifier as arrays, with their settings
                 as JSON in its metadata (pipeline.heads.stored)
  weights.safetensors  kind "finetuned": the network's state dict (safetensors)
  head.skops     kind "estimator": a scikit-learn estimator of the Python API that is not one of the zoo's,
                 with its preprocessing, kept with skops (read only where it names types skops trusts)
  metrics.json   the headline metrics, one value each (accuracy, timings, counts), for `pipeline compare`
  scores.json    the SCORES present (four for a single-label head), for `dvc metrics show`: its table stays within a terminal's width
  details.json   the chosen hyperparameters, the search that chose them, per-class precision and recall,
                 the reliability table of the scores
  familiarity.npz  the training vectors new images are compared with (float16 arrays): the head's
                 preprocessed features, or a fine-tuned network's penultimate ones
  held_out.npz   the labels (0/1 matrix of a multi-label model) and the model's own scores of the images of
                 its val score (val, or train's k folds), that a single-label head's calibration is fitted
                 on and whose bootstrap gives `pipeline compare` a multi-label interval
  confusion.json {actual, predicted} rows for `dvc plots show`

What each kind does with its file is `pipeline.models.directory`'s business.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.runtime.errors import InputError
from pipeline.runtime.files import sha256_file, staged_folder, write_atomically
from pipeline.runtime.reading import Field, checked, read_json
from pipeline.storage.records import PREPROCESSING

INFO = "model.json"
DETAILS = ("hyperparameters", "search", "per_class", "reliability")   # metrics that go to details.json
SCORES = ("top1", "balanced_accuracy", "macro_ap", "micro_ap", "macro_f1", "val_score")   # scores.json repeats those present


@dataclass(frozen=True)
class Kind:
    """A kind of model directory: the file holding its model, and how that file is written and read."""
    name: str
    model_file: str
    dump: Callable[[object, Path, dict], None]   # (model, path, model.json's fields)
    load: Callable[[Path], object]


def _arrays_save(content: tuple[dict, dict], path: Path, info: dict) -> None:
    from safetensors.numpy import save_file
    arrays, settings = content
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path),
              metadata={k: json.dumps(v) for k, v in settings.items()})


def _arrays_load(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        arrays, metadata = {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}
    return arrays, {k: json.loads(v) for k, v in metadata.items()}   # the file's header, not a file: no read_json


FEATURES = Kind("features", "head.safetensors", _arrays_save, _arrays_load)   # (arrays, JSON): pipeline.heads.stored


def _weights_save(state: dict, path: Path, info: dict) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def _weights_load(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


FINETUNED = Kind("finetuned", "weights.safetensors", _weights_save, _weights_load)


def skops():
    """skops.io, or an InputError saying how to install it."""
    try:
        import skops.io
    except ImportError:
        raise InputError("scikit-learn estimators other than the zoo's are kept with skops, which is not "
                         "installed: pip install skops")
    return skops.io


def _skops_save(model, path: Path, info: dict) -> None:
    skops().dump(model, str(path))


def _skops_load(path: Path):
    """The estimator, built only from the types skops trusts (scikit-learn's, numpy's): a file naming any
    other is refused unread."""
    io = skops()
    untrusted = io.get_untrusted_types(file=str(path))
    if untrusted:
        raise InputError(f"{path} names types that skops does not trust ({', '.join(untrusted[:3])}); "
                        f"refusing to load it")
    return io.load(str(path))


ESTIMATOR = Kind("estimator", "head.skops", _skops_save, _skops_load)
KINDS = {kind.name: kind for kind in (FEATURES, FINETUNED, ESTIMATOR)}
# the files of earlier versions that are pickles: refused, never read; each with the command writing its successor
PICKLED = {"head.joblib": ("train", FEATURES), "weights.pt": ("finetune", FINETUNED),
           "checkpoint.pt": ("finetune", FINETUNED)}


def check_out(out_dir: Path, force: bool = False, managed: tuple[str, ...] = ()) -> None:
    """Refuse, before any training, an --out that cannot become this model directory: a path through a
    file, an existing model directory (unless `force`), or a folder holding other files (which replacing
    it would delete). `managed`: files the producer itself keeps there (a fine-tuning checkpoint)."""
    out_dir = Path(out_dir)
    blocker = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise InputError(f"--out {out_dir}: {blocker} is a file, not a folder")
    if not out_dir.is_dir():
        return
    if (out_dir / INFO).exists():
        if not force:
            raise InputError(f"--out {out_dir} already holds a model directory; pass --force to replace it "
                            f"or choose another --out")
        return
    # DVC keeps a .gitignore in the folder of the outputs it caches; it writes it again after the stage
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in (*managed, ".gitignore"))
    if others:
        raise InputError(f"--out {out_dir} is a folder of other files ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}), not a model directory; choose a new or empty folder")


def staged(out_dir: Path):
    """A fresh temporary folder beside `out_dir` to write the model directory into, renamed over `out_dir`
    when complete (see `files.staged_folder`); `check_out` has decided that an existing `out_dir` may go."""
    return staged_folder(out_dir, "model directory", owned=False)


def write(folder: Path, kind: Kind, model, info: dict, metrics: dict, confusion: list[dict]) -> None:
    """Write the model file of `kind`, metrics.json (headline), scores.json (`SCORES`) and details.json
    (`DETAILS`), confusion.json
    and model.json (with the model file's SHA-256) into `folder`, normally the one `staged` gives."""
    folder = Path(folder)
    kind.dump(model, folder / kind.model_file, info)
    headline = {k: v for k, v in metrics.items() if k not in DETAILS}
    write_atomically(folder / "metrics.json", json.dumps(headline, indent=2) + "\n")
    write_atomically(folder / "scores.json", json.dumps({k: metrics[k] for k in SCORES if k in metrics}) + "\n")
    details = {k: metrics[k] for k in DETAILS if k in metrics}
    write_atomically(folder / "details.json", json.dumps(details, indent=2) + "\n")
    write_atomically(folder / "confusion.json", json.dumps(confusion) + "\n")
    info = dict(info, kind=kind.name, files={**info.get("files", {}),   # any the caller wrote, digested
                                             kind.model_file: sha256_file(folder / kind.model_file)})
    write_atomically(folder / INFO, json.dumps(info, indent=2) + "\n")


HELD_OUT = "held_out.npz"


def write_held_out(folder: Path, labels: np.ndarray, scores: np.ndarray) -> dict:
    """Write HELD_OUT into `folder`; returns model.json's "files" entry for it."""
    np.savez(Path(folder) / HELD_OUT, labels=labels.astype(np.uint8 if labels.ndim == 2 else np.int64),
             scores=scores.astype(np.float32))
    return {HELD_OUT: sha256_file(Path(folder) / HELD_OUT)}


def read_held_out(model_dir: Path, info: dict) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) of HELD_OUT in a model directory whose model.json is `info`, checked against its
    SHA-256; refused when absent (a model trained before it was kept) or of the wrong shape."""
    path = Path(model_dir) / HELD_OUT
    if HELD_OUT not in info["files"] or not path.is_file():
        raise InputError(f"{model_dir} keeps no held-out scores ({HELD_OUT}); train it again with this version")
    if sha256_file(path) != info["files"][HELD_OUT]:
        raise InputError(f"{path} does not match the SHA-256 recorded in {INFO}; refusing to read it")
    with np.load(path, allow_pickle=False) as arrays:
        labels, scores = arrays["labels"], arrays["scores"]
    if scores.shape[1:] != (len(info["classes"]),) or labels.shape not in (scores.shape, scores.shape[:1]):
        raise InputError(f"{path}: scores {scores.shape} must be [images, classes] and labels {labels.shape} "
                        f"[images] or [images, classes]")
    return labels, scores.astype(np.float64)


_FIELDS = {"kind": str, "classes": list, "backbone": dict, "files": dict}
_SHA256 = re.compile(r"[0-9a-f]{64}")
BACKBONE = {"backbone": Field(str), "weights": Field(str), "weights_sha256": Field(str), "preprocessing": Field(dict)}


def read_info(model_dir: Path) -> dict:
    """model.json, refused (naming its path) when it lacks a field or a field has the wrong form."""
    path = Path(model_dir) / INFO
    if not path.is_file():
        raise InputError(f"{model_dir} is not a model directory (no {INFO})")
    info = read_json(path, Field(dict))
    missing = [k for k in (*_FIELDS, "fingerprint") if k not in info]
    if missing:
        raise InputError(f"{path} lacks keys {missing}")
    for key, form in _FIELDS.items():
        if not isinstance(info[key], form):
            raise InputError(f"{path}: '{key}' must be a {form.__name__}, got {type(info[key]).__name__}")
    backbone = checked(info["backbone"], BACKBONE, f"{path}: backbone")
    checked(backbone["preprocessing"], PREPROCESSING, f"{path}: backbone.preprocessing")
    if info["kind"] not in KINDS:
        raise InputError(f"{path}: unknown kind {info['kind']!r}; expected one of {', '.join(KINDS)}")
    if len(info["classes"]) < 2 or not all(isinstance(c, str) for c in info["classes"]):
        raise InputError(f"{path}: 'classes' must list at least two class names")
    bad = [name for name, digest in info["files"].items()
           if Path(name).name != name or not isinstance(digest, str) or not _SHA256.fullmatch(digest)]
    if bad:
        raise InputError(f"{path}: 'files' must map file names in the folder to SHA-256 digests; "
                        f"{bad[0]!r} does not")
    return info


def refused_pickle(model_dir: Path, name: str) -> str:
    command, kind = PICKLED[name]
    return (f"{model_dir} holds {name}, a pickle, which this version never loads; "
            f"{'train' if command == 'train' else 'fine-tune'} it again with the same `pipeline {command}` "
            f"command to write {kind.model_file}")


def verify(model_dir: Path) -> dict:
    """model.json, after checking every file it lists against its recorded SHA-256."""
    info = read_info(model_dir)
    pickled = next((name for name in PICKLED if name in info["files"] or (Path(model_dir) / name).exists()), None)
    if pickled:
        raise InputError(refused_pickle(Path(model_dir), pickled))
    model_file = KINDS[info["kind"]].model_file
    if model_file not in info["files"]:
        raise InputError(f"{Path(model_dir) / INFO} records no SHA-256 for {model_file}; refusing to load it")
    for name, digest in info["files"].items():
        path = Path(model_dir) / name
        if not path.is_file():
            raise InputError(f"model directory {model_dir} lacks {name}")
        if sha256_file(path) != digest:
            raise InputError(f"{path} does not match the SHA-256 recorded in {INFO}; refusing to load it")
    return info


def read_model(model_dir: Path, kind: Kind):
    """The model file of `kind` in `model_dir` (a head's arrays and settings, or a state dict); `verify` it first."""
    path = Path(model_dir) / kind.model_file
    try:
        return kind.load(path)
    except InputError:
        raise
    except Exception as exc:   # a foreign or truncated file, or one that carries code
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputError(f"{path} cannot be read as a {kind.name} model: {reason}")


def load(model_dir: Path) -> tuple[dict, object]:
    """(model.json, the kind's model), read only after `verify`."""
    info = verify(model_dir)
    return info, read_model(model_dir, KINDS[info["kind"]])
