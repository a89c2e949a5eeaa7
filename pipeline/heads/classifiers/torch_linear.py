"""One linear layer in torch, AdamW with early stopping (pipeline.heads.torch_heads.TorchHead)."""
from __future__ import annotations

from pipeline.heads.classifiers import DECADES, TUNED, ClassifierSpec, rules, softmax_layers, torch_heads

TORCH_PARAMS = ("lr", "epochs", "batch_size", "patience", "seed", "device")


def build(weight_decay, class_weight=None, **params):
    return torch_heads().TorchHead(weight_decay=weight_decay, class_weight=class_weight, **params)


def to_torch(head):
    return softmax_layers(head.net_)


SPEC = ClassifierSpec("one linear layer in torch", "weight_decay", TUNED["weight_decay"], DECADES[:6], build,
                      rules(*TORCH_PARAMS), to_torch=to_torch, early_stops=True)
