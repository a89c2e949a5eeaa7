"""Loading a backbone: its family (pipeline.features.backbones) builds it, this loads its weights and hooks
its feature layers.

One door, `load_backbone`, like timm's `create_model`: call sites never hard-code a
layer name or a normalisation; they ask the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from pipeline.features import tokens
from pipeline.features.backbones import Entry, available, family_of
from pipeline.features.settings import BackboneSettings
from pipeline.features.spec import BackboneSpec, Preprocessing
from pipeline.runtime.errors import InputError, check_minimums
from pipeline.runtime.files import sha256_file

PRETRAINED = ("imagenet", "pretrained")   # the two spellings of a backbone's own pretrained weights


@dataclass
class Backbone:
    """A built, frozen backbone and everything that determines its feature vectors.

    `layers[0]` gives the default feature set; further layers are stored beside it."""
    name: str
    model: nn.Module
    layers: tuple[str, ...]
    feature_dims: dict[str, int]
    preprocessing: Preprocessing
    weights: str
    weights_sha256: str
    flattened: tuple[str, ...] = ()
    tta: bool = False                         # average each image with its horizontal flip
    notes: list[str] = field(default_factory=list)   # what loading the weights left out

    @property
    def layer(self) -> str:
        return self.layers[0]

    @property
    def feature_dim(self) -> int:
        return self.feature_dims[self.layer]

    def spec(self) -> BackboneSpec:
        return BackboneSpec(self.name, self.weights, self.weights_sha256, self.layers, self.preprocessing, self.tta)


def canonical_name(name: str) -> str:
    """The name a cache records (a timm model with its pretrained tag: `timm/resnet50` ->
    `timm/resnet50.a1_in1k`), after its family (pipeline.features.backbones) accepts it."""
    family = family_of(name)
    if family is None:
        raise InputError(f"unknown backbone '{name}'; choose one of: {', '.join(available())}")
    return family.canonical(name)


def _entry(name: str, image_size: int | None) -> Entry:
    """The registry entry of a canonical name."""
    return family_of(name).entry(name, image_size)


def _read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read weights file {path}: {exc.__class__.__name__}: {exc}".splitlines()[0])
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):   # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _load_state_dict(model: nn.Module, path: Path, name: str, classifier: str) -> list[str]:
    """Load a state dict into `model` and return notes on what was left out.

    A file whose keys differ but whose shapes line up in order (as the bundled EfficientNet-Lite0
    file against timm's model) is matched by position. The classifier is loaded when it fits and
    left out with a note when it does not (a head trained for other classes): features never use
    it. Missing or mis-shaped backbone keys are an error; keys the model lacks are a note."""
    state, own = _read_state_dict(path), model.state_dict()
    if set(state) - set(own) and len(state) == len(own) and all(
            a.shape == b.shape for a, b in zip(state.values(), own.values())):
        state = dict(zip(own, state.values()))

    def in_head(key: str) -> bool:
        return bool(classifier) and (key == classifier or key.startswith(classifier + "."))

    dropped = [k for k, v in state.items() if in_head(k) and (k not in own or own[k].shape != v.shape)]
    state = {k: v for k, v in state.items() if k not in dropped}
    missing = [k for k in own if k not in state and not in_head(k)]
    misfit = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or misfit:
        raise InputError(f"weights {path} do not fit {name}: {len(missing)} backbone keys missing "
                        f"(e.g. {missing[:3]}), {len(misfit)} of another shape (e.g. {misfit[:3]})")
    unexpected = [k for k in state if k not in own]
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    notes = []
    if any(in_head(k) and k not in state for k in own):
        why = f"its {len(dropped)} keys in the file do not fit ({', '.join(dropped[:2])})" if dropped else \
            "the file has none"
        notes.append(f"weights {path.name}: classifier '{classifier}' left random, {why}; "
                     f"features do not use it")
    if unexpected:
        notes.append(f"weights {path.name}: ignored {len(unexpected)} keys that {name} does not have "
                     f"(e.g. {unexpected[:3]})")
    return notes


def load_backbone(s: BackboneSettings) -> Backbone:
    """The backbone settings `s` name (extract's, bench's or finetune's: the layers and TTA where they have them)."""
    return build_backbone(s.backbone, s.weights, getattr(s, "layer", None), s.image_size, getattr(s, "tta", False))


def recorded_backbone(spec: BackboneSpec, weights: str | None = None) -> Backbone:
    """The backbone a cache or a model directory recorded (its default layer), with `weights` instead of the
    recorded ones when given."""
    return build_backbone(spec.name, weights or spec.weights, spec.layer, spec.preprocessing.image_size, spec.tta)


def build_backbone(name: str = "efficientnet_lite0", weights: str = "imagenet",
                   layer: str | Sequence[str] | None = None, image_size: int | None = None,
                   tta: bool = False) -> Backbone:
    """Build a frozen backbone in eval mode.

    weights: 'imagenet' or 'pretrained' (the same: bundled, the library's cache, or for timm models the
    Hugging Face hub), a path to a state dict (.pth or .safetensors), or 'none' (random init with a
    fixed seed, the from-scratch baseline).
    layer: one module name or several, or a transformer's token feature (`tokens`); the first gives the
    default feature set; default: the registry's layer, normally the global pool or the pre-logits.
    """
    check_minimums({"image_size": 1}, {"image_size": image_size})
    name = canonical_name(name)
    entry = _entry(name, image_size)
    notes: list[str] = []
    if entry.imagenet_weights is None:   # a network without weights
        if weights not in (*PRETRAINED, "none"):
            raise InputError(f"backbone {name} has no weights to load; leave --weights out")
        weights = "none"
    if weights == "none":
        torch.manual_seed(0)
        model, sha = entry.build(), "none"
    else:
        pretrained = weights in PRETRAINED
        if pretrained:
            weights = family_of(name).pretrained or weights
        path = entry.imagenet_weights() if pretrained else Path(weights)
        if not path.is_file():
            raise InputError(f"weights file {path} does not exist")
        if pretrained and entry.load_pretrained is not None:
            model = entry.load_pretrained(path)
        else:
            model = entry.build()
            notes = _load_state_dict(model, path, name, entry.classifier)
        sha = sha256_file(path)
    model.eval().requires_grad_(False)
    layers = tuple(dict.fromkeys([layer] if isinstance(layer, str) else (layer or [entry.layer])))
    modules = dict(model.named_modules())
    for chosen in layers:
        if tokens.is_token_feature(chosen):
            tokens.sources(model, chosen, name)
        elif chosen not in modules:
            offered = tokens.available(model)
            raise InputError(f"backbone {name} has no layer '{chosen}'; its top-level modules are: "
                            f"{', '.join(n for n, _ in model.named_children())}"
                            + (f"; its token features: {', '.join(offered)}" if offered else ""))
    pre = entry.preprocessing if image_size is None else entry.preprocessing.with_size(image_size)
    if pre.image_size != entry.preprocessing.image_size:
        _check_input_size(model, name, pre.image_size)
    backbone = Backbone(name, model, layers, {entry.layer: entry.feature_dim}, pre, weights, sha,
                        entry.flattened, tta, notes)
    if layers != (entry.layer,):
        backbone.feature_dims = _probe_dims(backbone)
    return backbone


def _check_input_size(model: nn.Module, name: str, size: int) -> None:
    """A network that cannot take `size` pixels (a ViT built for 224, a size too small for its pooling)
    is one clear error here rather than a traceback in the middle of a run."""
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = str(exc).splitlines()[0].rstrip(".")
        raise InputError(f"backbone {name} cannot take {size}x{size} images ({reason}); "
                        f"choose another --image-size or leave it out")


def _probe_dims(backbone: Backbone) -> dict[str, int]:
    """Feature size of each hooked layer, from one forward pass of a blank image."""
    from pipeline.features.engines.torch import Embedder
    size = backbone.preprocessing.image_size
    with Embedder(backbone) as embed:
        return {layer: f.shape[1] for layer, f in embed(torch.zeros(1, 3, size, size)).items()}
