"""One linear layer in torch, AdamW with early stopping (pipeline.heads.torch_heads.TorchHead)."""
from __future__ import annotations

import numpy as np

from pipeline.heads.classifiers import DECADES, TUNED, ClassifierSpec, rules, softmax_layers, torch_heads
from pipeline.heads.stored import Stored

TORCH_PARAMS = ("lr", "epochs", "batch_size", "patience", "seed", "device")


def build(weight_decay, class_weight=None, **params):
    return torch_heads().TorchHead(weight_decay=weight_decay, class_weight=class_weight, **params)


def state(head):
    """The network's state dict and classes, with the head's settings (which rebuild the network)."""
    multi = {"multi_label": np.ones(1, np.uint8)} if getattr(head, "multi_label_", False) else {}
    return ({f"net.{k}": v.numpy() for k, v in head.net_.state_dict().items()} | {"classes": head.classes_} | multi,
            head.get_params())


def restore(arrays, settings):
    import torch
    head = torch_heads().TorchHead(**settings)
    head.classes_ = arrays["classes"]
    head.multi_label_ = "multi_label" in arrays   # sigmoid scores, one per class
    weights = {k[len("net."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("net.")}
    head.net_ = head._network(weights["0.weight"].shape[1], len(head.classes_))
    head.net_.load_state_dict(weights)
    head.net_.eval()
    return head


STORED = Stored(state, restore)


def to_torch(head):
    return softmax_layers(head.net_)


SPEC = ClassifierSpec("one linear layer in torch", "weight_decay", TUNED["weight_decay"], DECADES[:6], build,
                      rules(*TORCH_PARAMS), to_torch=to_torch, early_stops=True,
                      stored=STORED, multi_label="native")
