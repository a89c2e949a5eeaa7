"""Ridge regression on one-vs-rest targets (scikit-learn's RidgeClassifier): one closed-form solve, decision
values, no probabilities. `alpha` is the L2 penalty, tuned on val."""
from __future__ import annotations

from pipeline.heads.classifiers import AUTO, ClassifierSpec, decision_layers
from pipeline.heads.stored import Stored, attributes, rebuilt
from pipeline.runtime.settings import Rule


def state(head):
    """Its attributes, its classes in place of the label binarizer that holds them."""
    arrays, settings = attributes(head, skip=("_label_binarizer",))
    return {**arrays, "classes": head.classes_}, settings


def restore(arrays, settings):
    from sklearn.linear_model import RidgeClassifier
    from sklearn.preprocessing import LabelBinarizer
    head = rebuilt(RidgeClassifier, {k: v for k, v in arrays.items() if k != "classes"}, settings)
    head._label_binarizer = LabelBinarizer(pos_label=1, neg_label=-1).fit(arrays["classes"])   # as fit makes it
    return head


def build(alpha, class_weight=None):
    from sklearn.linear_model import RidgeClassifier
    return RidgeClassifier(alpha=alpha, class_weight=class_weight)


SPEC = ClassifierSpec("ridge classifier, one closed-form solve", "alpha",
                      (AUTO | float, Rule("L2 penalty of the ridge solve.", above=0)),
                      tuple(10.0 ** k for k in range(-3, 4)), build, probabilities=False, to_torch=decision_layers,
                      stored=Stored(state, restore))
