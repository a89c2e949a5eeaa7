"""The torch engine: the frozen backbone (its BatchNorms folded) with a forward hook on each feature layer,
batches of images in, one [N, D] array per layer out; eager, compiled, or under bfloat16 autocast."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from pipeline.features import tokens
from pipeline.features.folding import folded

if TYPE_CHECKING:
    from pipeline.features.backbones.loading import Backbone


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
    device = next((p.device for p in backbone.model.parameters()), torch.device("cpu"))   # pixels: none
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
