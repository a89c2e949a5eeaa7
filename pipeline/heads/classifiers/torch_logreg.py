"""Logistic regression by full-batch L-BFGS in torch (pipeline.heads.torch_heads.TorchLogReg)."""
from __future__ import annotations

from pipeline.heads.classifiers import DECADES, TUNED, ClassifierSpec, linear_layer, rules, softmax_layers, torch_heads
from pipeline.heads.stored import plain
from pipeline.runtime.settings import Rule


def build(C, max_iter=100, device="auto", precision="auto", class_weight=None):
    return torch_heads().TorchLogReg(C=C, max_iter=max_iter, class_weight=class_weight, device=device,
                                     precision=precision)


def to_torch(head):
    """A softmax over one column per class, binary included."""
    return softmax_layers(linear_layer(head.coef_, head.intercept_))


PRECISION = (str, Rule("Type of the features in the solver; auto: bfloat16 on CPUs with native bfloat16 "
                       "arithmetic.", choices=("auto", "float32", "bfloat16")))
SPEC = ClassifierSpec("logistic regression by full-batch L-BFGS in torch", "C", TUNED["C"], DECADES[3:], build,
                      {**rules("max_iter", "device"), "precision": PRECISION}, to_torch=to_torch,
                      stored=plain("pipeline.heads.torch_heads", "TorchLogReg"))
