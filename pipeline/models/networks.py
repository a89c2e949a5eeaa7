"""A classifier on cached features as torch layers: the frozen backbone, the fitted feature preprocessing
and the head, giving the scores `pipeline predict` ranks. Export and Grad-CAM run these networks."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from torch import nn

from pipeline.features.backbones.loading import Backbone

from pipeline.features.engines.torch import FeatureHook, inference_model
from pipeline.heads.classifiers import CLASSIFIERS
from pipeline.runtime.errors import InputError


class L2Normalize(nn.Module):
    def forward(self, x):
        return nn.functional.normalize(x, dim=1)


class Standardize(nn.Module):
    def __init__(self, mean: np.ndarray, scale: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x):
        return (x - self.mean) / self.scale


class ClassColumns(nn.Module):
    """Place the head's columns at its classes' indices; classes it never saw get `fill` (as scores_of)."""

    def __init__(self, classes: np.ndarray, n_classes: int, fill: float):
        super().__init__()
        self.register_buffer("index", torch.as_tensor(classes, dtype=torch.long))
        self.n_classes, self.fill = n_classes, fill

    def forward(self, x):
        full = torch.full((x.shape[0], self.n_classes), self.fill, dtype=x.dtype, device=x.device)
        return full.index_copy(1, self.index, x)


def _preprocessing(step) -> nn.Module:
    if isinstance(step, Normalizer) and step.norm == "l2":
        return L2Normalize()
    if isinstance(step, StandardScaler):
        return Standardize(step.mean_, step.scale_)
    if isinstance(step, FunctionTransformer) and step.func is None:
        return nn.Identity()
    raise InputError(f"feature preprocessing {step!r} cannot be exported")


def head_module(model, n_classes: int, name: str) -> nn.Module:
    """The fitted preprocessing + head pipeline as torch layers giving the scores `scores_of` gives."""
    pre, head = model[0], model[-1]
    exportable = [n for n, spec in CLASSIFIERS.items() if spec.to_torch]
    if name not in exportable:
        raise InputError(f"a {name} head is not made of tensor operations (needed to export it or for "
                        f"Grad-CAM); {', '.join(exportable[:-1])} and {exportable[-1]} are, and fine-tuned models")
    from pipeline.heads import multilabel
    if multilabel.is_multi_label(head):
        return nn.Sequential(_preprocessing(pre), *multilabel.torch_layers(head)).eval()
    layers, fill = CLASSIFIERS[name].to_torch(head)
    if len(head.classes_) < n_classes:
        layers.append(ClassColumns(head.classes_, n_classes, fill))
    return nn.Sequential(_preprocessing(pre), *layers).eval()


class ImageClassifier(nn.Module):
    """Frozen backbone (its BatchNorms folded, as in extraction) up to its feature layer (pooled or
    flattened as in extraction, averaged with the left-right flipped image when the cache was made with
    TTA), then the head."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.model, self.head, self.tta = inference_model(backbone), head, backbone.tta
        self.hook = FeatureHook(self.model, backbone.layer, backbone.layer in backbone.flattened)

    def _features(self, images):
        self.model(images)
        return self.hook.output

    def forward(self, images):
        features = self._features(images)
        if self.tta:
            features = (features + self._features(images.flip(-1))) / 2
        return self.head(features)
