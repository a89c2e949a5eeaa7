"""The forms of the backbone records that feature caches (root attributes) and model directories (model.json)
keep, checked where they are read; `features.spec` builds its objects from records of these forms."""
from __future__ import annotations

from pipeline.runtime.reading import Field

_NUMBER = (int, float)
LAYERS = Field(list, items=Field(str))
PREPROCESSING = {   # as a cache's transform attribute and model.json record it
    "image_size": Field(int, min=1, max=8192), "resize": Field(int, min=1, max=16384),
    "interpolation": Field(str, choices=("bilinear", "bicubic")),
    "mean": Field((list, tuple), length=3, items=Field(_NUMBER, min=-1e3, max=1e3)),
    "std": Field((list, tuple), length=3, items=Field(_NUMBER, above=0, max=1e3)),
}
