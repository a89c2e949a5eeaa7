"""An MLP in torch: features -> `hidden` ReLU, dropout, `depth` times -> classes (pipeline.heads.torch_heads)."""
from __future__ import annotations

from pipeline.heads.classifiers import DECADES, TUNED, ClassifierSpec, rules, torch_heads
from pipeline.heads.classifiers.torch_linear import STORED, TORCH_PARAMS, to_torch
from pipeline.runtime.settings import Rule


def build(weight_decay, hidden=256, dropout=0.5, class_weight=None, **params):
    return torch_heads().TorchHead(weight_decay=weight_decay, hidden=hidden, dropout=dropout,
                                   class_weight=class_weight, **params)


OWN = {
    "hidden": (int, Rule("Width of each hidden layer.", min=1, max=65536)),
    "depth": (int, Rule("Hidden layers.", min=1, max=64)),
    "dropout": (float, Rule("Dropout after each hidden layer.", min=0, below=1)),
}
SPEC = ClassifierSpec("an MLP in torch", "weight_decay", TUNED["weight_decay"], DECADES[:6], build,
                      {**OWN, **rules(*TORCH_PARAMS)}, to_torch=to_torch, early_stops=True,
                      stored=STORED, multi_label="native")
