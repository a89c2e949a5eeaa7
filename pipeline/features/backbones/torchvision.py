"""torchvision's ImageNet classifiers, with its weights (its cache, a download, or a local file)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.features.backbones import IMAGENET_MEAN, IMAGENET_STD, Entry, Family, Known
from pipeline.features.spec import Preprocessing
from pipeline.runtime.errors import InputError

KNOWN = {
    "resnet18": Known("avgpool", 512, "fc"),
    "resnet34": Known("avgpool", 512, "fc"),
    "resnet50": Known("avgpool", 2048, "fc"),
    "resnet101": Known("avgpool", 2048, "fc"),
    # the penultimate 4096-d layer (after its ReLU); "avgpool" gives the 25088-d conv features
    "vgg16": Known("classifier.4", 4096, "classifier.6", flattened=("avgpool",)),
    "efficientnet_b0": Known("avgpool", 1280, "classifier.1"),
    "mobilenet_v3_large": Known("avgpool", 960, "classifier.3"),
    "convnext_tiny": Known("avgpool", 768, "classifier.2"),
}


def _weights(name: str) -> Callable[[], Path]:
    def fetch() -> Path:
        import torch
        from torchvision import models
        url = models.get_model_weights(name).DEFAULT.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if not cached.exists():
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(cached), progress=False)
            except Exception as exc:
                reason = str(getattr(exc, "reason", exc)).splitlines()[0]
                raise InputError(f"cannot download ImageNet weights for {name} ({reason}); download {url} "
                                f"on a machine with network, then pass --weights PATH or copy it to {cached}")
        return cached
    return fetch


def entry(name: str, image_size: int | None) -> Entry:
    from torchvision import models
    known = KNOWN[name]
    return Entry(lambda: models.get_model(name, weights=None), _weights(name), known.layer, known.feature_dim,
                 Preprocessing(224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD), known.classifier, known.flattened)


FAMILY = Family("torchvision's ImageNet classifiers", entry, KNOWN, rank=1)
