"""Token features of a vision transformer (timm's ViT, DeiT, DINOv2, CLIP, SigLIP, EVA...): the choices
linear-probe papers take, as named feature layers beside the module names `--layer` accepts.

  cls_token       the class token of the final tokens (`forward_features`)
  patch_mean      the mean of the final patch tokens (class and register tokens left out)
  cls_patch_mean  the two concatenated: DINOv2's linear evaluation
  cls_last<N>     the class tokens of the last N blocks, each through the final norm, concatenated
                  (e.g. cls_last4: DINOv2's linear evaluation of its small models, and iBOT's)

Each is computed from the outputs of the modules it hooks (the final `norm`, or the last N `blocks`) in the
same forward pass as every other feature layer.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from pipeline.runtime.errors import InputError

NAMES = ("cls_token", "patch_mean", "cls_patch_mean", "cls_last<N>")
PATTERN = re.compile(r"cls_token|patch_mean|cls_patch_mean|cls_last([1-9]\d*)")


def is_token_feature(layer: str) -> bool:
    return PATTERN.fullmatch(layer) is not None


def available(model: nn.Module) -> list[str]:
    """The token features `model` offers: none without a transformer's token sequence, no class-token
    features without a class token (SigLIP pools its tokens by attention instead)."""
    if not all(hasattr(model, a) for a in ("blocks", "norm", "num_prefix_tokens")):
        return []
    return list(NAMES) if getattr(model, "cls_token", None) is not None else ["patch_mean"]


def sources(model: nn.Module, layer: str, backbone: str) -> list[str]:
    """The modules whose outputs `layer` is computed from; an InputError when `model` does not offer it."""
    offered = available(model)
    match = PATTERN.fullmatch(layer)
    if not (layer in offered or (match.group(1) and "cls_last<N>" in offered)):
        raise InputError(f"backbone {backbone} has no token feature '{layer}'; "
                        f"it offers: {', '.join(offered) or 'none (not a vision transformer)'}")
    if not match.group(1):
        return ["norm"]
    n, depth = int(match.group(1)), len(model.blocks)
    if n > depth:
        raise InputError(f"backbone {backbone} has {depth} blocks, fewer than the {n} of '{layer}'")
    return [f"blocks.{i}" for i in range(depth - n, depth)]


def register(model: nn.Module, layer: str, keep: Callable[[torch.Tensor], None]) -> list:
    """Forward hooks on `model` that pass the [N, D] feature `layer` to `keep` once per forward pass."""
    modules = dict(model.named_modules())
    prefix = model.num_prefix_tokens
    if layer.startswith("cls_last"):
        names = sources(model, layer, "")
        parts: list[torch.Tensor] = []

        def block(module, inputs, output, last=modules[names[-1]]):
            # the norm's own forward: hooks on `norm` (another token feature) see only the final tokens
            parts.append(model.norm.forward(output[:, 0]))
            if module is last:
                keep(torch.cat(parts, 1))
                parts.clear()
        return [modules[name].register_forward_hook(block) for name in names]

    def final(module, inputs, tokens):
        features = {"cls_token": tokens[:, 0], "patch_mean": tokens[:, prefix:].mean(1)}
        keep(features[layer] if layer in features else torch.cat(list(features.values()), 1))
    return [model.norm.register_forward_hook(final)]
