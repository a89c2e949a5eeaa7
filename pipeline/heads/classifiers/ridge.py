"""Ridge regression on one-vs-rest targets (scikit-learn's RidgeClassifier): one closed-form solve, decision
values, no probabilities. `alpha` is the L2 penalty, tuned on val."""
from __future__ import annotations

from pipeline.heads.classifiers import AUTO, ClassifierSpec, decision_layers
from pipeline.runtime.settings import Rule


def build(alpha, class_weight=None):
    from sklearn.linear_model import RidgeClassifier
    return RidgeClassifier(alpha=alpha, class_weight=class_weight)


SPEC = ClassifierSpec("ridge classifier, one closed-form solve", "alpha",
                      (AUTO | float, Rule("L2 penalty of the ridge solve.", above=0)),
                      tuple(10.0 ** k for k in range(-3, 4)), build, probabilities=False, to_torch=decision_layers)
