"""Any timm model as timm/<architecture>[.<tag>], with its pretrained weights from the Hugging Face hub
(pipeline.features.hub)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.features.backbones import Entry, Family
from pipeline.features.spec import Preprocessing
from pipeline.runtime.errors import InputError

if TYPE_CHECKING:
    from torch import nn

PREFIX = "timm/"


def canonical(name: str) -> str:
    """With its pretrained tag: `timm/resnet50` -> `timm/resnet50.a1_in1k`, timm's default tag."""
    from pipeline.features.hub import pretrained_name
    return PREFIX + pretrained_name(name.removeprefix(PREFIX))


def entry(name: str, image_size: int | None) -> Entry:
    return _entry(name.removeprefix(PREFIX), image_size)


def _entry(model_name: str, image_size: int | None) -> Entry:
    """A timm model (`architecture.tag`, the tag already resolved) with the preprocessing of its pretrained
    config. Another `image_size` than its own builds a transformer with timm's dynamic image size (the
    position embedding resampled to the new grid) where the model offers it."""
    import timm

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
            raise InputError(f"weights {path} do not fit timm/{model_name}: {str(exc).splitlines()[0]}")
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
    import torch
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


FAMILY = Family("any timm model, weights from the Hugging Face hub", entry, prefix=PREFIX,
                pattern="timm/<any timm model name>", canonical=canonical, pretrained="pretrained", rank=2)
