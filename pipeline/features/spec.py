"""What determines a backbone's feature vectors, as plain data: the image preprocessing and the backbone spec
(name, weights and their SHA-256, feature layers, preprocessing, TTA) that feature caches record as root
attributes and model directories keep in model.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to `resize`, centre-crop `image_size`, normalise."""
    image_size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(d["image_size"], d["resize"], d["interpolation"], tuple(d["mean"]), tuple(d["std"]))

    def with_size(self, image_size: int) -> "Preprocessing":
        """The same recipe at another size, keeping the crop ratio."""
        resize = round(image_size * self.resize / self.image_size)
        return Preprocessing(image_size, resize, self.interpolation, self.mean, self.std)

    def transform(self, normalise: bool = True):
        """PIL image -> tensor; without `normalise` the pixels stay in [0, 1] (to measure them)."""
        from torchvision import transforms as T
        mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[self.interpolation]
        steps = [T.Resize(self.resize, interpolation=mode), T.CenterCrop(self.image_size), T.ToTensor()]
        return T.Compose(steps + [T.Normalize(self.mean, self.std)] if normalise else steps)


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone as recorded: enough to load it again (`load_backbone`) and to tell caches apart."""
    name: str                        # registry name, or timm/<architecture>.<tag>
    weights: str                     # 'imagenet', 'pretrained', a path, or 'none'
    weights_sha256: str              # of the weights file loaded ('none' for random weights)
    layers: tuple[str, ...]          # feature layers, the default first
    preprocessing: Preprocessing
    tta: bool = False

    @property
    def layer(self) -> str:
        return self.layers[0]

    def to_attrs(self) -> dict:
        """The feature cache's root attributes for this backbone (JSON-valued where not scalar)."""
        return {"backbone": self.name, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "layer": self.layer, "layers": json.dumps(list(self.layers)),
                "image_size": self.preprocessing.image_size,
                "transform": json.dumps(self.preprocessing.to_dict(), sort_keys=True), "tta": self.tta}

    @classmethod
    def from_attrs(cls, attrs: dict) -> "BackboneSpec":
        return cls(attrs["backbone"], attrs["weights"], attrs["weights_sha256"], tuple(json.loads(attrs["layers"])),
                   Preprocessing.from_dict(json.loads(attrs["transform"])), bool(attrs["tta"]))

    def to_dict(self) -> dict:
        """The form model.json keeps."""
        return {"backbone": self.name, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "layer": self.layer, "layers": list(self.layers), "tta": self.tta,
                "preprocessing": self.preprocessing.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSpec":
        """From model.json; directories written before `layers` and `tta` were recorded have the default layer
        alone and no TTA."""
        return cls(d["backbone"], d["weights"], d["weights_sha256"], tuple(d.get("layers") or [d["layer"]]),
                   Preprocessing.from_dict(d["preprocessing"]), bool(d.get("tta", False)))
