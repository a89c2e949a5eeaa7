"""A fitted preprocessing + head as arrays and JSON, with no pickle (head.safetensors): the arrays are the
file's tensors, the classifier's name and settings its JSON metadata. Each classifier says how its fitted
head becomes arrays and settings and back (`ClassifierSpec.stored`); the classes rebuilt are fixed by that
code, never named by the file, so reading a file runs nothing it holds."""
from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from pipeline.runtime.errors import InputError

FILE = "head.safetensors"
PICKLED = "head.joblib"   # the file model directories held before: refused, never read


class Stored(NamedTuple):
    """How a classifier's fitted head is kept: `state` gives (arrays {name: ndarray}, settings as JSON),
    `restore` (arrays, settings) gives the fitted head back."""
    state: Callable
    restore: Callable


def attributes(obj, skip: tuple = ()) -> tuple[dict, dict]:
    """A scikit-learn object's attributes (settings and fitted state): its arrays, and the rest, which must
    be numbers, text, None or lists of them (checked when written as JSON)."""
    arrays, settings = {}, {}
    for name, value in vars(obj).items():
        if name in skip:
            continue
        if isinstance(value, np.ndarray):
            arrays[name] = value
        else:
            settings[name] = value.item() if isinstance(value, np.generic) else value
    return arrays, settings


def rebuilt(cls, arrays: dict, settings: dict):
    """An object of `cls` holding the attributes `attributes` gave, its constructor not run."""
    obj = cls.__new__(cls)
    obj.__dict__.update(settings)
    obj.__dict__.update(arrays)
    return obj


def plain(module: str, name: str) -> Stored:
    """A head of class `module`.`name` whose every attribute is an array or a JSON value (`attributes`)."""
    return Stored(attributes, lambda arrays, settings: rebuilt(getattr(import_module(module), name), arrays, settings))


def _parts(prefix: str, arrays: dict) -> dict:
    return {name[len(prefix):]: a for name, a in arrays.items() if name.startswith(prefix)}


def _preprocessors() -> dict:
    from pipeline.heads.train import PREPROCESSING, _preprocessor
    return {kind: type(_preprocessor(kind)) for kind in PREPROCESSING}


def dump(model, classifier: str, path: Path) -> None:
    """Write the fitted pipeline (preprocessing, head) of zoo classifier `classifier` to `path`; refuse a
    head of another kind (`check_storable`)."""
    from safetensors.numpy import save_file
    spec = check_storable(classifier)
    kind = next(k for k, cls in _preprocessors().items() if type(model[0]) is cls)
    pre_arrays, pre_settings = attributes(model[0])
    head_arrays, head_settings = spec.stored.state(model[-1])
    arrays = {**{f"preprocess.{k}": v for k, v in pre_arrays.items()},
              **{f"head.{k}": v for k, v in head_arrays.items()}}
    meta = {"classifier": classifier, "preprocess": kind, "preprocess_settings": json.dumps(pre_settings),
            "head_settings": json.dumps(head_settings)}
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path), metadata=meta)


def load(path: Path):
    """The fitted pipeline `dump` wrote at `path`."""
    from safetensors import safe_open
    from sklearn.pipeline import make_pipeline
    if Path(path).name == PICKLED:
        raise InputError(refused_pickle(Path(path).parent))
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
        arrays = {name: f.get_tensor(name) for name in f.keys()}
    spec = check_storable(meta.get("classifier", ""))
    cls = _preprocessors()[meta["preprocess"]]
    pre = rebuilt(cls, _parts("preprocess.", arrays), json.loads(meta["preprocess_settings"]))
    return make_pipeline(pre, spec.stored.restore(_parts("head.", arrays), json.loads(meta["head_settings"])))


def check_storable(classifier: str):
    """The spec of zoo classifier `classifier`; another estimator is refused: a model directory holds only
    arrays and JSON, which a scikit-learn estimator of the user's cannot be written as."""
    from pipeline.heads.classifiers import CLASSIFIERS
    if classifier not in CLASSIFIERS:
        raise InputError(f"a {classifier or 'head'} cannot be saved: a model directory keeps only the zoo's "
                         f"classifiers ({', '.join(CLASSIFIERS)}), as arrays and JSON, never as a pickle")
    return CLASSIFIERS[classifier]


def refused_pickle(model_dir: Path) -> str:
    return (f"{model_dir} holds {PICKLED}, a pickle, which this version never loads; train it again with the "
            f"same `pipeline train` command to write {FILE}")
