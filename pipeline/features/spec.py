"""What determines a backbone's feature vectors, as plain data: the image preprocessing and the backbone spec
(name, weights and their SHA-256, feature layers, preprocessing, TTA) that feature caches record as root
attributes and model directories keep in model.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from PIL import Image

from pipeline.runtime.reading import Field, checked, parsed
from pipeline.storage.records import LAYERS, PREPROCESSING


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
    def from_dict(cls, d: dict, where: str = "preprocessing") -> "Preprocessing":
        """The recipe `d` records, refused (naming `where` and the field) unless it has `PREPROCESSING`'s form."""
        checked(d, PREPROCESSING, where)
        return cls(d["image_size"], d["resize"], d["interpolation"], tuple(d["mean"]), tuple(d["std"]))

    def with_size(self, image_size: int) -> "Preprocessing":
        """The same recipe at another size, keeping the crop ratio."""
        resize = round(image_size * self.resize / self.image_size)
        return Preprocessing(image_size, resize, self.interpolation, self.mean, self.std)

    def transform(self, normalise: bool = True):
        """PIL image -> tensor; without `normalise` the pixels stay in [0, 1] (to measure them)."""
        from torchvision import transforms as T
        steps = [self.resize_crop, T.ToTensor()]
        return T.Compose(steps + [T.Normalize(self.mean, self.std)] if normalise else steps)

    def geometry(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(resized height, width, crop top, left) of an h x w image, as torchvision's `Resize(resize)` sizes
        it and `CenterCrop(image_size)` places the crop."""
        new_long = int(self.resize * max(h, w) / min(h, w))
        new_h, new_w = (self.resize, new_long) if h <= w else (new_long, self.resize)
        return new_h, new_w, round((new_h - self.image_size) / 2), round((new_w - self.image_size) / 2)

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """torchvision's `Resize(resize)` then `CenterCrop(image_size)` of a PIL image (at most one value in 500
        differs, by a grey level), about a third faster: only the pixels the crop keeps are resampled."""
        w, h = img.size
        new_h, new_w, top, left = self.geometry(h, w)
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[self.interpolation]
        size = self.image_size
        if min(new_w, new_h) < size:        # the crop pads
            from torchvision.transforms.functional import center_crop
            return center_crop(img.resize((new_w, new_h), resample), [size])
        sx, sy = w / new_w, h / new_h
        # one axis per call: given both, Pillow resamples vertically first, which rounds differently
        columns = img.resize((size, h), resample, box=(left * sx, 0, (left + size) * sx, h))
        return columns.resize((size, size), resample, box=(0, top * sy, size, (top + size) * sy))


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone as recorded: enough to load it again (`recorded_backbone`) and to tell caches apart."""
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
        where = "feature cache attribute"
        layers = tuple(parsed(attrs["layers"], LAYERS, f"{where} layers"))
        transform = parsed(attrs["transform"], Field(dict), f"{where} transform")
        return cls(attrs["backbone"], attrs["weights"], attrs["weights_sha256"], layers,
                   Preprocessing.from_dict(transform, f"{where} transform"), bool(attrs["tta"]))

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
