"""BatchNorm folding for a frozen network: a BatchNorm in eval mode is a fixed per-channel affine map,
so it can be merged into the convolution whose output it normalises. One layer fewer to run per pair:
`extract` 1.1-1.2x faster on a 2-core CPU (benchmarks/RESULTS.md), with the same features to float
rounding."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ActivationAfterFold(nn.Module):
    """What is left of a timm norm+activation layer (BatchNormAct2d) once its BatchNorm is folded. Its
    submodules keep their names (`drop`, `act`), so a feature layer named inside it is still found."""

    def __init__(self, norm_act: nn.Module):
        super().__init__()
        self.drop, self.act = norm_act.drop, norm_act.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def folded(original: nn.Module, layers: tuple[str, ...], example: torch.Tensor, tolerance: float = 1e-4) -> nn.Module:
    """A copy of `original` (an eval-mode network) with each BatchNorm2d that only normalises a Conv2d's
    output folded into that convolution; `original` itself when there is none. A convolution named in
    `layers` keeps its own output. The copy is checked on `example`: if an output of `layers` moves by more
    than `tolerance` (relative to its largest value), as when a convolution's output is also used
    elsewhere, `original` is returned instead."""
    before, pairs = _outputs_and_pairs(original, layers, example)
    names = {module: name for name, module in original.named_modules()}
    pairs = [(names[conv], names[norm]) for conv, norm in dict.fromkeys(pairs)   # a module run twice pairs twice
             if names[conv] not in layers and _foldable(norm)]
    if not pairs:
        return original
    model = copy.deepcopy(original)
    for conv, norm in pairs:
        norm_module = model.get_submodule(norm)
        _merge(model.get_submodule(conv), norm_module)
        parent, _, attr = norm.rpartition(".")
        setattr(model.get_submodule(parent), attr,
                nn.Identity() if type(norm_module) is nn.BatchNorm2d else ActivationAfterFold(norm_module))
    after, _ = _outputs_and_pairs(model, layers, example)
    for layer in layers:
        scale = before[layer].abs().max().clamp_min(1e-12)
        if not torch.allclose(before[layer], after[layer], rtol=0, atol=tolerance * float(scale)):
            return original
    return model


def _foldable(norm: nn.BatchNorm2d) -> bool:
    """Running statistics to fold, and nothing after the normalisation but what `ActivationAfterFold` runs."""
    if norm.running_mean is None or norm.running_var is None:
        return False
    return type(norm) is nn.BatchNorm2d or (hasattr(norm, "drop") and hasattr(norm, "act"))


def _merge(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
        shift = (bias - norm.running_mean) * scale + (norm.bias if norm.bias is not None else 0)
        conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
        conv.bias = nn.Parameter(shift, requires_grad=False)


def _outputs_and_pairs(model: nn.Module, layers: tuple[str, ...], example: torch.Tensor):
    """One forward pass of `example`: the outputs of `layers`, and each (Conv2d, BatchNorm2d) where the
    BatchNorm's input is the very tensor the convolution returned."""
    modules = dict(model.named_modules())
    conv_outputs, pairs, outputs, handles = {}, [], {}, []

    def conv_hook(conv, inputs, output):
        conv_outputs[id(output)] = (conv, output)     # the tensor is kept, so its id is not reused

    def norm_hook(norm, inputs):
        conv, output = conv_outputs.get(id(inputs[0]), (None, None))
        if output is inputs[0]:
            pairs.append((conv, norm))

    def keep(name):
        def hook(module, inputs, output):
            outputs[name] = (output[0] if isinstance(output, (tuple, list)) else output).clone()
        return hook

    for module in modules.values():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(norm_hook))
    handles += [modules[name].register_forward_hook(keep(name)) for name in layers]
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False    # its rounding on CUDA would hide what folding changes
    try:
        with torch.inference_mode():
            model(example)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        for handle in handles:
            handle.remove()
    return outputs, pairs
