"""Backbone families: one module per family in this package, each holding its `FAMILY` (the names it offers,
how it builds a network and where its feature layer is). A module added here is a family `pipeline extract
--backbone` accepts and the lists name. The command line reads the registry without torch: the modules import
torch, torchvision and timm only when they build a network; `loading` loads the weights and hooks the layers."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import nn

    from pipeline.features.spec import Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Known:
    """A backbone a family offers by name."""
    layer: str                                # module whose output is the feature vector
    feature_dim: int
    classifier: str                           # the ImageNet head, which features never need
    flattened: tuple[str, ...] = ()           # layers whose spatial output is flattened, not pooled


@dataclass(frozen=True)
class Entry:
    """How to build one backbone."""
    build: Callable[[], nn.Module]            # architecture with random weights
    imagenet_weights: Callable[[], Path] | None   # local file of ImageNet weights (may download); None: it has none
    layer: str                                # module whose output is the feature vector
    feature_dim: int
    preprocessing: Preprocessing
    classifier: str                           # the ImageNet head, which features never need
    flattened: tuple[str, ...] = ()           # layers whose spatial output is flattened, not pooled
    # builds the model with the pretrained file loaded by its own library (timm: checkpoint filters)
    load_pretrained: Callable[[Path], nn.Module] | None = None


@dataclass(frozen=True)
class Family:
    doc: str                                  # what it is, for the docs' list
    entry: Callable[[str, int | None], Entry]    # (canonical name, image size or None) -> its entry
    known: dict[str, Known] = field(default_factory=dict)   # the names it offers
    prefix: str | None = None                 # or every name with this prefix (timm/<model>)
    pattern: str = ""                         # how such a name is written, for the lists
    canonical: Callable[[str], str] = str     # the name a cache records
    pretrained: str | None = None             # how 'imagenet'/'pretrained' weights are recorded (None: as given)
    rank: int = 0                             # place in the lists

    def claims(self, name: str) -> bool:
        return name in self.known or bool(self.prefix) and name.startswith(self.prefix)


def _registry() -> list[Family]:
    modules = [m.name for m in pkgutil.iter_modules(__path__) if m.name != "loading" and not m.name.startswith("_")]
    return sorted((importlib.import_module(f"{__name__}.{name}").FAMILY for name in modules), key=lambda f: f.rank)


def family_of(name: str) -> Family | None:
    return next((family for family in FAMILIES if family.claims(name)), None)


def available() -> list[str]:
    """Every name offered, and the patterns of the open families."""
    return [*KNOWN, *(family.pattern for family in FAMILIES if family.prefix)]


FAMILIES = _registry()   # last: the modules import the names above
KNOWN: dict[str, Known] = {name: known for family in FAMILIES for name, known in family.known.items()}
