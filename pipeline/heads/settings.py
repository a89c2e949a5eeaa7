"""The settings of stage two (kept free of torch and sklearn, for a quick command line): the registry of
classifiers (the tuned hyperparameter, its grid, the fixed settings each takes) and every setting's rule.
The estimators themselves are built in pipeline.heads.classifiers."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from pipeline.runtime.devices import DEVICES
from pipeline.runtime.errors import InputError, quote
from pipeline.runtime.settings import Rule, check_value, fields, from_mapping, key_name, setting


@dataclass(frozen=True)
class Classifier:
    doc: str                         # what it is, in a few words
    tuned: str                       # the hyperparameter model selection searches
    grid: tuple                      # coarse log-spaced grid for it
    params: tuple[str, ...]          # the fixed settings params.yaml and --param may set


_TORCH_PARAMS = ("lr", "epochs", "batch_size", "patience", "seed", "device")
_DECADES = tuple(10.0 ** k for k in range(-6, 4))
CLASSIFIERS = {
    "logreg": Classifier("multinomial logistic regression", "C", _DECADES[3:], ("max_iter", "seed")),
    "torch_logreg": Classifier("logistic regression by full-batch L-BFGS in torch", "C", _DECADES[3:],
                               ("max_iter", "device", "precision")),
    "linear_svm": Classifier("linear SVM", "C", _DECADES[2:-1], ("max_iter", "seed")),
    "rbf_svm": Classifier("RBF-kernel SVM, calibrated", "C", _DECADES[4:], ("gamma", "seed")),
    "knn": Classifier("k-nearest neighbours", "n_neighbors", (1, 3, 5, 9, 15, 25), ()),
    "torch_linear": Classifier("one linear layer in torch", "weight_decay", _DECADES[:6], _TORCH_PARAMS),
    "torch_mlp": Classifier("an MLP in torch", "weight_decay", _DECADES[:6], ("hidden", "depth", "dropout",
                                                                             *_TORCH_PARAMS)),
}


def _gamma(value) -> str | None:
    ok = value in ("scale", "auto") if isinstance(value, str) else value > 0
    return None if ok else "must be a positive number, 'scale' or 'auto'"


AUTO = Literal["auto"]
TUNED = {   # the hyperparameter each classifier tunes: 'auto' searches it on val
    "C": (AUTO | float, Rule("Inverse regularisation strength.", above=0)),
    "n_neighbors": (AUTO | int, Rule("Neighbours that vote.", min=1)),
    "weight_decay": (AUTO | float, Rule("AdamW weight decay.", min=0)),
}
PARAMS = {   # the fixed settings a classifier may take (its registry entry names which)
    "max_iter": (int, Rule("Iterations of the solver.", min=1, max=10 ** 7)),
    "seed": (int, Rule("Seed of the solver, or of a torch head's initialisation and batches.")),
    "device": (str, Rule("auto picks CUDA when present.", choices=DEVICES)),
    "precision": (str, Rule("Type of the features in the solver; auto: bfloat16 on CPUs with native bfloat16 "
                            "arithmetic.", choices=("auto", "float32", "bfloat16"))),
    "gamma": (float | str, Rule("RBF kernel width: a number, 'scale' or 'auto'.", check=_gamma)),
    "lr": (float, Rule("AdamW learning rate; default: 0.1 over the mean length of the training vectors for "
                       "torch_linear (0.1 on L2-normalised ones), 0.01 for torch_mlp.", above=0)),
    "epochs": (int, Rule("Epochs at most (early stopping on val loss).", min=1, max=10 ** 6)),
    "batch_size": (int, Rule("Rows per step.", min=1, max=10 ** 7)),
    "patience": (int, Rule("Epochs without a better val loss before stopping.", min=1)),
    "hidden": (int, Rule("Width of each hidden layer.", min=1, max=65536)),
    "depth": (int, Rule("Hidden layers.", min=1, max=64)),
    "dropout": (float, Rule("Dropout after each hidden layer.", min=0, below=1)),
}
PREPROCESSING = ("l2", "standardize", "none")


@dataclass
class TrainSettings:
    """Stage two: params.yaml `train.<classifier>` and the options of `pipeline train`. The tuned value and
    the classifier's own settings (`params`) depend on the classifier: see `with_params`."""
    classifier: str = setting("logreg", "The classifier to fit.", choices=tuple(CLASSIFIERS))
    value: float | str = "auto"          # the tuned hyperparameter, or "auto" to search for it
    params: dict = field(default_factory=dict)
    preprocess: str = setting("l2", "Feature preprocessing, fitted on the training rows.", choices=PREPROCESSING)
    class_weight: str | None = setting(None, "'balanced' to reweight rare classes.", choices=("balanced",))
    cv_folds: int = setting(5, "Folds for selection when the cache has no test split.", min=2, max=100)
    seed: int = setting(0, "Seed of the folds and of the classifier.")


def own_keys(classifier: str) -> tuple[str, ...]:
    """The tuned hyperparameter and the settings only this classifier has (not those of TrainSettings)."""
    spec = CLASSIFIERS[classifier]
    common = {f.name for f in fields(TrainSettings)}
    return (spec.tuned, *(key for key in spec.params if key not in common))


def with_params(s: TrainSettings, raw: dict, label) -> TrainSettings:
    """`s` with its tuned value and its classifier's own settings from `raw` (params.yaml keys or --param
    pairs), each checked; `label(key)` names a key in messages."""
    tuned, *own = own_keys(s.classifier)
    for key in raw:
        if key not in (tuned, *own):
            raise InputError(f"{label(key_name(key))} is not a setting of {s.classifier}; "
                            f"allowed: {', '.join((tuned, *own))}")
    value = check_value(label(tuned), raw.get(tuned, "auto"), *TUNED[tuned])
    params = {key: check_value(label(key), raw[key], *PARAMS[key]) for key in own if key in raw}
    return replace(s, value=value, params=params)


def train_settings(name: str, raw: dict | None) -> TrainSettings:
    """The settings of params.yaml `train.<name>`: the key names the classifier."""
    if name not in CLASSIFIERS:
        raise InputError(f"params.yaml: train.{name}: unknown classifier '{name}'; "
                        f"choose one of: {', '.join(CLASSIFIERS)}")
    raw = raw or {}
    if not isinstance(raw, dict):
        raise InputError(f"params.yaml: train.{name} must be a mapping of settings, got {quote(raw)}")
    common = [f.name for f in fields(TrainSettings) if f.name != "classifier"]
    spec = CLASSIFIERS[name]
    allowed = list(dict.fromkeys((spec.tuned, *common, *spec.params)))
    for key in raw:
        if key not in allowed:
            raise InputError(f"params.yaml: train.{name}.{key_name(key)} is not a "
                            f"setting of {name}; allowed: {', '.join(allowed)}")
    s = from_mapping(TrainSettings, {"classifier": name, **{k: v for k, v in raw.items() if k in common}},
                     f"train.{name}")
    return with_params(s, {k: v for k, v in raw.items() if k not in common},
                       lambda key: f"params.yaml: train.{name}.{key}")


