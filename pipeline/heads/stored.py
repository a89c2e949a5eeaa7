"""A fitted preprocessing + head as arrays and JSON, with no pickle: what a model directory's head.safetensors
holds (pipeline.storage.modeldir), the arrays as its tensors, the classifier's name and settings as JSON.
Each classifier says how its fitted head becomes arrays and settings and back (`ClassifierSpec.stored`);
the classes rebuilt are fixed by that code, never named by the file, so reading one runs nothing it holds.
A scikit-learn estimator of the Python API that is not one of the zoo's is kept with skops instead (`form`)."""
from __future__ import annotations

from importlib import import_module
from typing import Callable, NamedTuple

import numpy as np

from pipeline.runtime.errors import InputError


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


def part(prefix: str, arrays: dict) -> dict:
    """The arrays named `prefix`..., without it."""
    return {name[len(prefix):]: a for name, a in arrays.items() if name.startswith(prefix)}


def one_vs_rest(inner: Stored) -> Stored:
    """A scikit-learn OneVsRestClassifier fitted on a multi-label 0/1 matrix, each class's binary head kept
    as `inner` keeps one (its arrays prefixed with the class's column, "3.coef_")."""
    def state(head):
        arrays, settings = {}, []
        for column, binary in enumerate(head.estimators_):
            a, binary_settings = inner.state(binary)
            arrays.update({f"{column}.{name}": value for name, value in a.items()})
            settings.append(binary_settings)
        return arrays, {"columns": settings}

    def restore(arrays, settings):
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.preprocessing import LabelBinarizer
        binaries = [inner.restore(part(f"{column}.", arrays), binary_settings)
                    for column, binary_settings in enumerate(settings["columns"])]
        head = OneVsRestClassifier(binaries[0])   # the template scikit-learn reads its tags from
        head.estimators_ = binaries
        head.label_binarizer_ = LabelBinarizer(sparse_output=True).fit(np.eye(len(head.estimators_), dtype=int))
        head.classes_ = head.label_binarizer_.classes_   # as fit leaves them: a multi-label binarizer
        return head
    return Stored(state, restore)


def _is_one_vs_rest(head) -> bool:
    return type(head).__name__ == "OneVsRestClassifier" and type(head).__module__ == "sklearn.multiclass"


def _preprocessors() -> dict:
    from pipeline.heads.train import PREPROCESSING, _preprocessor
    return {kind: type(_preprocessor(kind)) for kind in PREPROCESSING}


def form(model, classifier: str):
    """(the kind of model directory, the content its model file is written from) of the fitted pipeline
    (preprocessing, head): the zoo's classifiers as arrays and JSON (`state`), another scikit-learn estimator
    with skops, refused (before anything is written) where its file would name a type skops does not trust,
    as loading it would then be refused."""
    from pipeline.heads.classifiers import CLASSIFIERS
    from pipeline.storage import modeldir
    if classifier in CLASSIFIERS:
        return modeldir.FEATURES, state(model, classifier)
    io = modeldir.skops()
    untrusted = io.get_untrusted_types(data=io.dumps(model))
    if untrusted:
        raise InputError(f"a {classifier} cannot be saved: it holds types that skops does not trust "
                         f"({', '.join(untrusted[:3])}), so loading it would be refused; a model directory "
                         f"keeps scikit-learn's own estimators, never a pickle")
    return modeldir.ESTIMATOR, model


def state(model, classifier: str) -> tuple[dict, dict]:
    """(arrays, settings as JSON) of the fitted pipeline (preprocessing, head) of zoo classifier `classifier`,
    as `modeldir.FEATURES` writes them."""
    spec = zoo_spec(classifier)
    kind = next(k for k, cls in _preprocessors().items() if type(model[0]) is cls)
    pre_arrays, pre_settings = attributes(model[0])
    ovr = _is_one_vs_rest(model[-1])
    head_arrays, head_settings = (one_vs_rest(spec.stored) if ovr else spec.stored).state(model[-1])
    arrays = {**{f"preprocess.{k}": v for k, v in pre_arrays.items()},
              **{f"head.{k}": v for k, v in head_arrays.items()}}
    return arrays, {"classifier": classifier, "preprocess": kind, "preprocess_settings": pre_settings,
                    "head_settings": head_settings, **({"one_vs_rest": True} if ovr else {})}


def restored(arrays: dict, settings: dict):
    """The fitted pipeline `state` gave (arrays, settings) of."""
    from sklearn.pipeline import make_pipeline
    spec = zoo_spec(settings["classifier"])
    pre = rebuilt(_preprocessors()[settings["preprocess"]], part("preprocess.", arrays),
                  settings["preprocess_settings"])
    how = one_vs_rest(spec.stored) if settings.get("one_vs_rest") else spec.stored
    return make_pipeline(pre, how.restore(part("head.", arrays), settings["head_settings"]))


def zoo_spec(classifier: str):
    """The spec of zoo classifier `classifier`; ValueError for another (a file naming an unknown one)."""
    from pipeline.heads.classifiers import CLASSIFIERS
    if classifier not in CLASSIFIERS:
        raise ValueError(f"{classifier!r} is not a classifier of the zoo")
    return CLASSIFIERS[classifier]


def check_storable(classifier: str) -> None:
    """Refuse, before fitting, a head that could not be saved: an estimator of the API where skops is missing."""
    from pipeline.heads.classifiers import CLASSIFIERS
    if classifier not in CLASSIFIERS:
        from pipeline.storage import modeldir
        modeldir.skops()
