"""Linear SVM (scikit-learn's LinearSVC): decision values, no probabilities."""
from __future__ import annotations

from pipeline.heads.classifiers import DECADES, TUNED, ClassifierSpec, decision_layers, rules
from pipeline.heads.stored import plain


def build(C, max_iter=5000, seed=0, class_weight=None):
    from sklearn.svm import LinearSVC
    return LinearSVC(C=C, max_iter=max_iter, random_state=seed, class_weight=class_weight)


SPEC = ClassifierSpec("linear SVM", "C", TUNED["C"], DECADES[2:-1], build, rules("max_iter", "seed"),
                      probabilities=False, to_torch=decision_layers,
                      stored=plain("sklearn.svm", "LinearSVC"))
