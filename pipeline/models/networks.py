"""A classifier on cached features as torch layers: the frozen backbone, the fitted feature preprocessing
and the head, giving the scores `pipeline predict` ranks. Export and Grad-CAM run these networks."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from torch import nn

from pipeline.features.backbones import Backbone, FeatureHook, inference_model
from pipeline.heads.torch_heads import TorchHead, TorchLogReg
from pipeline.runtime.errors import InputError

TENSOR_HEADS = "logreg, torch_logreg, linear_svm, torch_linear and torch_mlp"   # what `head_module` builds


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


def _linear(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return layer


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
    if isinstance(head, TorchHead):
        layers, fill = [head.net_, nn.Softmax(dim=1)], 0.0
    elif isinstance(head, LogisticRegression):
        w, b = head.coef_, head.intercept_
        if len(head.classes_) == 2:   # predict_proba = [1 - sigmoid(d), sigmoid(d)] = softmax([-d/2, d/2])
            w, b = np.concatenate([-w, w]) / 2, np.concatenate([-b, b]) / 2
        layers, fill = [_linear(w, b), nn.Softmax(dim=1)], 0.0
    elif isinstance(head, TorchLogReg):   # a softmax over one column per class, binary included
        layers, fill = [_linear(head.coef_, head.intercept_), nn.Softmax(dim=1)], 0.0
    elif isinstance(head, LinearSVC):
        w, b = head.coef_, head.intercept_
        if len(head.classes_) == 2:   # decision values as head_scores gives them: [-d, d]
            w, b = np.concatenate([-w, w]), np.concatenate([-b, b])
        layers, fill = [_linear(w, b)], float("-inf")
    else:
        raise InputError(f"a {name} head is not made of tensor operations (needed to export it or for "
                        f"Grad-CAM); {TENSOR_HEADS} are, and fine-tuned models")
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
