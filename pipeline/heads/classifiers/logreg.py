"""Multinomial logistic regression (scikit-learn)."""
from __future__ import annotations

from pipeline.heads.classifiers import DECADES, TUNED, ClassifierSpec, linear_layer, rules, softmax_layers
from pipeline.heads.stored import plain


def build(C, max_iter=2000, seed=0, class_weight=None):
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(C=C, max_iter=max_iter, random_state=seed, class_weight=class_weight)


def to_torch(head):
    """predict_proba as a softmax; binary: [1 - sigmoid(d), sigmoid(d)] = softmax([-d/2, d/2])."""
    import numpy as np
    w, b = head.coef_, head.intercept_
    if len(head.classes_) == 2:
        w, b = np.concatenate([-w, w]) / 2, np.concatenate([-b, b]) / 2
    return softmax_layers(linear_layer(w, b))


SPEC = ClassifierSpec("multinomial logistic regression", "C", TUNED["C"], DECADES[3:], build,
                      rules("max_iter", "seed"), to_torch=to_torch,
                      stored=plain("sklearn.linear_model", "LogisticRegression"))
