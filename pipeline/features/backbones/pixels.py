"""The image itself as its feature vector: its pixels, resized (shorter side) and centre-cropped to
`image_size`, scaled to [-1, 1] and flattened. No network and no weights: the sweep's sanity baseline, which
tells whether a pretrained backbone's features help at all."""
from __future__ import annotations

from pipeline.features.backbones import Entry, Family, Known
from pipeline.features.spec import Preprocessing

SIZE = 32        # default image_size: 3,072 values a vector
KNOWN = {"pixels": Known("pixels", 3 * SIZE * SIZE, "")}


def entry(name: str, image_size: int | None) -> Entry:
    from collections import OrderedDict

    from torch import nn
    size = image_size or SIZE
    return Entry(lambda: nn.Sequential(OrderedDict(pixels=nn.Flatten())), None, "pixels", 3 * size * size,
                 Preprocessing(size, size, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "")


FAMILY = Family("the image's pixels, no network: the baseline", entry, KNOWN, rank=3)
