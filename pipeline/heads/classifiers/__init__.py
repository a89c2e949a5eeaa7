"""Stage two classifiers: one module per classifier in this package, each holding its `SPEC` (what it is, the
hyperparameter model selection tunes and its grid, the fixed settings it takes with their rules, how to build it,
what it can do, how its fitted head is kept as arrays and JSON). A module added here is a classifier of
`pipeline train`, params.yaml and the docs' table.

Every head has fit(X, y), predict(X), and scores: probabilities where the model has them, decision values
otherwise. The modules import scikit-learn and torch only when a head is built: the command line reads the
registry without them.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
from dataclasses import dataclass, field, replace
from typing import Callable, Literal

from pipeline.heads.stored import Stored
from pipeline.runtime.devices import device_setting
from pipeline.runtime.errors import InputError
from pipeline.runtime.settings import Rule, rule

SMALL_PROBLEM = 4_000_000   # training values (rows x features) up to which a head trains on one CPU thread

RULES = {   # fixed settings several classifiers take; a module lists those it takes (`rules`) and adds its own
    "max_iter": (int, Rule("Iterations of the solver.", min=1, max=10 ** 7)),
    "seed": (int, Rule("Seed of the solver, or of a torch head's initialisation and batches.")),
    "device": (str, rule(device_setting())),
    "lr": (float, Rule("AdamW learning rate; default: 0.1 over the mean length of the training vectors for "
                       "torch_linear (0.1 on L2-normalised ones), 0.01 for torch_mlp.", above=0)),
    "epochs": (int, Rule("Epochs at most (early stopping on val loss).", min=1, max=10 ** 6)),
    "batch_size": (int, Rule("Rows per step.", min=1, max=10 ** 7)),
    "patience": (int, Rule("Epochs without a better val loss before stopping.", min=1)),
}
AUTO = Literal["auto"]
TUNED = {   # tuned hyperparameters several classifiers share; 'auto' searches them on val
    "C": (AUTO | float, Rule("Inverse regularisation strength.", above=0)),
    "weight_decay": (AUTO | float, Rule("AdamW weight decay.", min=0)),
}
DECADES = tuple(10.0 ** k for k in range(-6, 4))


def rules(*names: str) -> dict:
    """The shared rules of settings `names`, for a module's `params`."""
    return {name: RULES[name] for name in names}


@dataclass(frozen=True)
class ClassifierSpec:
    """One classifier of stage two. The default grid policy is a log-spaced grid, stepped past an edge best
    value and refined between the best value's neighbours; a module may override the three methods below."""
    doc: str                          # what it is, in a few words
    tuned: str                        # the hyperparameter model selection searches
    tuned_rule: tuple                 # (type, Rule) of the tuned value; 'auto' searches it
    grid: tuple                       # the coarse grid searched
    build: Callable                   # (tuned value, class_weight=None, **params) -> an unfitted estimator
    params: dict = field(default_factory=dict)   # fixed settings params.yaml and --param may set: (type, Rule)
    probabilities: bool = True        # its scores are probabilities (else decision values)
    to_torch: Callable | None = None  # fitted head -> (torch layers, fill of unseen classes): export, Grad-CAM
    early_stops: bool = False         # fit(X, y, X_val, y_val) stops when the val loss stops falling
    floor: float = 1e-6               # calibration clips its probabilities here before the log
    stored: Stored | None = None      # how its fitted head is kept as arrays + JSON
    multi_label: str = "one-vs-rest"  # on a multi-label cache: one binary head per class ("one-vs-rest"), the head
                                      # itself fitted on the 0/1 matrix ("native"), or refused ("")
    name: str = ""                    # the module's name, set by the registry

    @property
    def in_torch(self) -> bool:
        """Whether it trains in torch (those heads, and only they, take a device)."""
        return "device" in self.params

    def candidates(self, values: list[float], n_fit: int) -> list[float]:
        """The values a fit of `n_fit` training rows can take."""
        return list(values)

    def beyond(self, tried: dict, best: float, n_fit: int) -> float | None:
        """One step of the grid past the edge value `best`; None when `best` is not at an edge."""
        values = sorted(tried)
        if best not in (values[0], values[-1]) or len(values) < 2:
            return None
        low = best == values[0]
        return best / (values[1] / values[0]) if low else best * (values[-1] / values[-2])

    def refined(self, tried: dict, best: float) -> list[float]:
        """Five log-spaced points between the best value's neighbours, those not tried yet."""
        import numpy as np
        values = sorted(tried)
        i = values.index(best)
        lo, hi = values[max(i - 1, 0)], values[min(i + 1, len(values) - 1)]
        return [float(v) for v in np.geomspace(lo, hi, 5) if not np.isclose(v, values).any()]


def _registry() -> dict[str, ClassifierSpec]:
    found = {}
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            spec = importlib.import_module(f"{__name__}.{module.name}").SPEC
            found[module.name] = replace(spec, name=module.name)
    return {"logreg": found.pop("logreg"), **found}   # the default first


def spec_of(name: str) -> ClassifierSpec:
    if name not in CLASSIFIERS:
        raise InputError(f"unknown classifier '{name}'; choose one of: {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[name]


@contextlib.contextmanager
def one_thread_if_small(n_values: int, in_torch: bool):
    """One CPU thread (BLAS, OpenMP and, for a head that runs `in_torch`, torch) while fitting a small
    problem: its products are too small to share, and waking a second thread for each cost up to 20x the
    time on a busy 2-core machine (sklearn's logreg on 1,120 x 1,280 vectors: 5 s against 100 s; a torch
    head on 245 x 1,280: 0.3 s against 15 s)."""
    if n_values > SMALL_PROBLEM:
        yield
        return
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1), (_one_torch_thread() if in_torch else contextlib.nullcontext()):
        yield


@contextlib.contextmanager
def _one_torch_thread():
    import torch  # here, not above: sklearn's heads train without loading torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def runs_in_torch(name: str) -> bool:
    """Whether classifier `name` is one of the torch heads (they, and only they, take a device)."""
    return spec_of(name).in_torch


def torch_heads():
    from pipeline.heads import torch_heads
    return torch_heads


def import_libraries(name: str) -> None:
    """Import what classifier `name` trains with (torch, for the torch heads), as callers do in their import
    window (`heavy_imports`), where it costs less: `pipeline train --classifier torch_logreg` on a small cache
    took 8.4-9.4 s instead of 10.4-11.9."""
    if runs_in_torch(name):
        torch_heads()


def __getattr__(name: str):
    """Estimators by the names model directories written before this package recorded."""
    if name in ("TorchHead", "TorchLogReg"):
        return getattr(torch_heads(), name)
    if name == "CalibratedRbfSVM":
        return importlib.import_module(f"{__name__}.rbf_svm").CalibratedRbfSVM
    raise AttributeError(f"module {__name__} has no attribute {name}")


def make_head(name: str, value, class_weight: str | None = None, **params):
    """A fresh, unfitted classifier `name` with its tuned hyperparameter set to `value`."""
    spec = spec_of(name)
    unknown = set(params) - set(spec.params)
    if unknown:
        raise InputError(f"classifier {name} has no parameter {sorted(unknown)[0]!r}; "
                        f"it takes: {', '.join((spec.tuned, 'class_weight', *spec.params))}")
    if class_weight not in (None, "balanced"):
        raise InputError(f"class_weight must be 'balanced' or empty, got {class_weight!r}")
    return spec.build(value, class_weight=class_weight, **params)


def head_scores(model, X):
    """Per-class scores: probabilities where available, else decision values."""
    if hasattr(model, "scores"):      # the torch heads
        return model.scores(X)
    if hasattr(model, "predict_proba"):
        return model.predict_proba(X)
    import numpy as np
    s = model.decision_function(X)
    return np.stack([-s, s], 1) if s.ndim == 1 else s


def has_probabilities(model) -> bool:
    return hasattr(model, "predict_proba")


def linear_layer(weight, bias):
    """A torch linear layer holding `weight` [classes, features] and `bias`."""
    import torch
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return layer


def decision_layers(head) -> tuple[list, float]:
    """A linear head's decision values as `head_scores` gives them (binary: [-d, d]) in torch; the columns of
    classes it never saw are -inf."""
    import numpy as np
    w, b = np.atleast_2d(head.coef_), np.atleast_1d(head.intercept_)   # a binary ridge's are one row, flat
    if len(head.classes_) == 2:
        w, b = np.concatenate([-w, w]), np.concatenate([-b, b])
    return [linear_layer(w, b)], float("-inf")


def softmax_layers(*layers) -> tuple[list, float]:
    """Torch layers followed by a softmax: probabilities, 0 for classes never seen."""
    import torch
    return [*layers, torch.nn.Softmax(dim=1)], 0.0


CLASSIFIERS: dict[str, ClassifierSpec] = _registry()   # last: the modules import the names above
