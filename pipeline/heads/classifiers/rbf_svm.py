"""An RBF-kernel SVM with calibrated probabilities (scikit-learn's SVC in CalibratedClassifierCV)."""
from __future__ import annotations

import functools

import numpy as np

from pipeline.heads.classifiers import DECADES, TUNED, ClassifierSpec, rules
from pipeline.heads.stored import Stored, attributes, part, rebuilt
from pipeline.runtime.settings import Rule


@functools.cache
def _estimator():
    """The estimator class, made on first use: the registry is read without importing scikit-learn."""
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC
    from sklearn.utils.class_weight import compute_sample_weight

    class CalibratedRbfSVM(BaseEstimator, ClassifierMixin):
        """An RBF SVM with calibrated probabilities. class_weight='balanced' weights the samples of both the
        SVM and its calibration; weighting the SVM alone is undone by calibrating on unweighted data.
        The search for C scores the SVM alone (`for_search`): calibrating costs five more fits per value (a C
        search on the demo's cache took 20 s instead of 3); at three values of C there, it moved the val
        accuracy by at most 0.003."""

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

        def predict_proba(self, X):
            return self.model_.predict_proba(X)

        def predict(self, X):
            return self.model_.predict(X)

    CalibratedRbfSVM.__module__, CalibratedRbfSVM.__qualname__ = __name__, "CalibratedRbfSVM"   # as pickled
    return CalibratedRbfSVM


def __getattr__(name: str):
    if name == "CalibratedRbfSVM":
        return _estimator()
    raise AttributeError(f"module {__name__} has no attribute {name}")


def state(head):
    """The SVM's support vectors, dual coefficients, intercepts and kernel settings (`svm.`), the sigmoid
    of each calibrated column (`sigmoid<i>.`), the wrapper's settings and classes."""
    calibrated = head.model_.calibrated_classifiers_[0]   # one: fitted with ensemble=False
    svm, settings = attributes(calibrated.estimator)
    arrays = {f"svm.{k}": v for k, v in svm.items()}
    for i, sigmoid in enumerate(calibrated.calibrators):
        arrays |= {f"sigmoid{i}.{k}": np.asarray(v) for k, v in vars(sigmoid).items()}
    own, settings_own = attributes(head, skip=("model_",))
    return {**arrays, **own}, {"svm": settings, "wrapper": settings_own, "sigmoids": len(calibrated.calibrators)}


def restore(arrays, settings):
    from sklearn.calibration import CalibratedClassifierCV, _CalibratedClassifier, _SigmoidCalibration
    from sklearn.svm import SVC
    svm = rebuilt(SVC, part("svm.", arrays), settings["svm"])
    sigmoids = [rebuilt(_SigmoidCalibration, {}, part(f"sigmoid{i}.", arrays)) for i in range(settings["sigmoids"])]
    head = rebuilt(_estimator(), {"classes_": arrays["classes_"]}, settings["wrapper"])
    head.model_ = CalibratedClassifierCV(svm, ensemble=False)   # fitted: the attributes fit gives it
    head.model_.classes_ = head.classes_
    head.model_.calibrated_classifiers_ = [_CalibratedClassifier(svm, sigmoids, classes=head.classes_,
                                                                  method="sigmoid")]
    return head


def build(C, gamma="scale", seed=0, class_weight=None):
    return _estimator()(C, gamma, class_weight, seed)


def _gamma(value) -> str | None:
    ok = value in ("scale", "auto") if isinstance(value, str) else value > 0
    return None if ok else "must be a positive number, 'scale' or 'auto'"


SPEC = ClassifierSpec("RBF-kernel SVM, calibrated", "C", TUNED["C"], DECADES[4:], build,
                      {"gamma": (float | str, Rule("RBF kernel width: a number, 'scale' or 'auto'.", check=_gamma)),
                       **rules("seed")}, stored=Stored(state, restore), multi_label="")
