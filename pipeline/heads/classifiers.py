"""Stage two classifiers: one small sklearn-style surface over sklearn and torch.

Every head has fit(X, y), predict(X), scores(X) (probabilities where the model has them,
decision values otherwise) and names the one hyperparameter model selection tunes.
"""
from __future__ import annotations

import contextlib

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.class_weight import compute_sample_weight
from threadpoolctl import threadpool_limits

from pipeline.heads.settings import CLASSIFIERS
from pipeline.runtime.errors import InputError

SMALL_PROBLEM = 4_000_000   # training values (rows x features) up to which a head trains on one CPU thread


@contextlib.contextmanager
def one_thread_if_small(n_values: int, in_torch: bool):
    """One CPU thread (BLAS, OpenMP and, for a head that runs `in_torch`, torch) while fitting a small
    problem: its products are too small to share, and waking a second thread for each cost up to 20x the
    time on a busy 2-core machine (sklearn's logreg on 1,120 x 1,280 vectors: 5 s against 100 s; a torch
    head on 245 x 1,280: 0.3 s against 15 s)."""
    if n_values > SMALL_PROBLEM:
        yield
        return
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
    return "device" in CLASSIFIERS[name].params


class CalibratedRbfSVM(BaseEstimator, ClassifierMixin):
    """An RBF SVM with calibrated probabilities. class_weight='balanced' weights the samples of both the
    SVM and its calibration; weighting the SVM alone is undone by calibrating on unweighted data.
    The search for C scores the SVM alone (`for_search`): calibrating costs five more fits per value (a C
    search on the demo's cache took 20 s instead of 3); at three values of C there, it moved the val accuracy by
    at most 0.003."""

    def __init__(self, C: float = 1.0, gamma="scale", class_weight: str | None = None, seed: int = 0):
        self.C, self.gamma, self.class_weight, self.seed = C, gamma, class_weight, seed

    def fit(self, X, y):
        weight = compute_sample_weight(self.class_weight, y) if self.class_weight else None
        svc = SVC(C=self.C, gamma=self.gamma, random_state=self.seed)
        self.model_ = CalibratedClassifierCV(svc, ensemble=False).fit(X, y, sample_weight=weight)
        self.classes_ = self.model_.classes_
        return self

    def for_search(self) -> SVC:
        """The same SVM uncalibrated, whose predictions score a value of C during the search."""
        return SVC(C=self.C, gamma=self.gamma, class_weight=self.class_weight, random_state=self.seed)

    def predict_proba(self, X) -> np.ndarray:
        return self.model_.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        return self.model_.predict(X)


def _rbf_svm(v, gamma="scale", seed=0, class_weight=None):
    return CalibratedRbfSVM(v, gamma, class_weight, seed)


def _knn(v, class_weight=None):
    if class_weight is not None:
        raise InputError("classifier knn does not support class_weight")
    return KNeighborsClassifier(n_neighbors=int(v), weights="distance")


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
    """The torch heads by their former names here (model directories written before they moved)."""
    if name in ("TorchHead", "TorchLogReg"):
        return getattr(torch_heads(), name)
    raise AttributeError(f"module {__name__} has no attribute {name}")


BUILDERS = {   # name -> (tuned value, **fixed params) -> an unfitted estimator; names and params: CLASSIFIERS
    "logreg": lambda v, max_iter=2000, seed=0, class_weight=None: LogisticRegression(
        C=v, max_iter=max_iter, random_state=seed, class_weight=class_weight),
    "torch_logreg": lambda v, max_iter=100, device="auto", precision="auto", class_weight=None:
        torch_heads().TorchLogReg(C=v, max_iter=max_iter, class_weight=class_weight, device=device,
                                  precision=precision),
    "linear_svm": lambda v, max_iter=5000, seed=0, class_weight=None: LinearSVC(
        C=v, max_iter=max_iter, random_state=seed, class_weight=class_weight),
    "rbf_svm": _rbf_svm,
    "knn": _knn,
    "torch_linear": lambda v, **kw: torch_heads().TorchHead(weight_decay=v, **kw),
    "torch_mlp": lambda v, hidden=256, dropout=0.5, **kw: torch_heads().TorchHead(
        weight_decay=v, hidden=hidden, dropout=dropout, **kw),
}


def make_head(name: str, value, class_weight: str | None = None, **params):
    """A fresh, unfitted classifier `name` with its tuned hyperparameter set to `value`."""
    if name not in CLASSIFIERS:
        raise InputError(f"unknown classifier '{name}'; choose one of: {', '.join(CLASSIFIERS)}")
    spec = CLASSIFIERS[name]
    unknown = set(params) - set(spec.params)
    if unknown:
        raise InputError(f"classifier {name} has no parameter {sorted(unknown)[0]!r}; "
                        f"it takes: {', '.join((spec.tuned, 'class_weight', *spec.params))}")
    if class_weight not in (None, "balanced"):
        raise InputError(f"class_weight must be 'balanced' or empty, got {class_weight!r}")
    return BUILDERS[name](value, class_weight=class_weight, **params)


def head_scores(model, X) -> np.ndarray:
    """Per-class scores: probabilities where available, else decision values."""
    if hasattr(model, "scores"):      # the torch heads
        return model.scores(X)
    if hasattr(model, "predict_proba"):
        return model.predict_proba(X)
    s = model.decision_function(X)
    return np.stack([-s, s], 1) if s.ndim == 1 else s


def has_probabilities(model) -> bool:
    return hasattr(model, "predict_proba")
