"""Visual checks of a model directory: predictions on a grid of images, and Grad-CAM heat maps.

The true class of an image is its parent folder's name when that is one of the model's classes
(as in ROOT/test/CLASS/*.png); other images show the prediction alone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.folders import find_images
from pipeline.data.images import ImageError, read_image
from pipeline.features.backbones import Preprocessing
from pipeline.models.predict import predict
from pipeline.runtime.devices import resolve_device
from pipeline.runtime.errors import UserError, check_minimums
from pipeline.storage import modeldir


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def image_files(inputs: list[Path]) -> list[Path]:
    """The images among `inputs` (files, folders), as `predict` finds them."""
    return [path for path, reason in find_images(inputs) if reason is None]


def _spread(paths: list[Path], limit: int) -> list[Path]:
    """At most `limit` paths, evenly spaced over the sorted list, so a test folder shows every class."""
    step = max(1, -(-len(paths) // limit))
    return paths[::step][:limit]


def _true_class(path: Path, classes: list[str]) -> str | None:
    return path.parent.name if path.parent.name in classes else None


def _grid(n: int, rows_per_item: int = 1):
    plt = _pyplot()
    cols = min(n, 6)
    rows = -(-n // cols) * rows_per_item
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return plt, fig, axes


def prediction_grid(model_dir: Path, inputs: list[Path], out: Path, limit: int = 24,
                    device: str = "auto") -> dict:
    """Save a grid of up to `limit` images titled with predicted (and true) class; wrong ones in red."""
    check_minimums({"limit": 1}, {"limit": limit})
    classes = modeldir.read_info(model_dir)["classes"]
    results = [r for r in predict(model_dir, _spread(image_files(inputs), limit), top_k=1, device=device) if "top" in r]
    if not results:
        raise UserError("no readable image to show")
    plt, fig, axes = _grid(len(results))
    wrong = 0
    for ax, r in zip(axes.flat, results):
        path, top = Path(r["path"]), r["top"][0]
        truth = _true_class(path, classes)
        wrong += truth is not None and truth != top["class"]
        colour = "black" if truth is None else "green" if truth == top["class"] else "red"
        ax.imshow(read_image(path)[0])
        ax.set_title(f"{top['class']} {top['score']:.2f}" + (f"\ntrue: {truth}" if truth else ""),
                     color=colour, fontsize=8)
        if colour == "red":
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set(color="red", linewidth=3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"shown": len(results), "wrong": int(wrong)}


def gradcam_maps(net: torch.nn.Module, pool: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM (Selvaraju et al.) for the predicted class: the feature map entering the global-pool
    module `pool`, weighted by the spatially averaged gradient of the class score. Returns (maps in [0, 1]
    at the input size, predicted classes)."""
    kept = {}

    def keep_first(module, inputs, output) -> None:   # with TTA the mirrored image runs second
        kept.setdefault("fmap", inputs[0])

    handle = pool.register_forward_hook(keep_first)
    try:
        scores = net(images.requires_grad_(True))
    finally:
        handle.remove()
    fmap = kept["fmap"]
    if fmap.dim() != 4:
        raise UserError(f"Grad-CAM needs a spatial feature map entering the feature layer, found shape "
                        f"{tuple(fmap.shape)}")
    predicted = scores.argmax(1)
    grads, = torch.autograd.grad(scores.gather(1, predicted[:, None]).sum(), fmap)
    cam = torch.relu((grads.mean((2, 3), keepdim=True) * fmap).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.flatten(1).max(1).values.clamp_min(1e-8)[:, None, None]
    return cam.detach().cpu().numpy(), predicted.cpu().numpy()


def differentiable(info: dict, state) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model directory as one network from normalised images to class scores, and its feature layer.
    A fine-tuned network as it is; a classifier on cached features as backbone + feature preprocessing +
    head in torch (as `export` builds it: class probabilities, or decision values for linear_svm)."""
    layer = info["backbone"]["layer"]
    if info["kind"] == "finetuned":
        from pipeline.finetune.training import network
        net = network(info, state)
        return net, dict(net.backbone.named_modules())[layer]
    from pipeline.models.export import TENSOR_HEADS, ImageClassifier, head_module
    from pipeline.models.predict import model_backbone
    classifier = info.get("classifier", "this")
    try:
        head = head_module(state, len(info["classes"]), classifier)
    except UserError:
        raise UserError(f"Grad-CAM needs a head made of tensor operations ({TENSOR_HEADS}, or a fine-tuned "
                        f"model); a {classifier} head is not") from None
    net = ImageClassifier(model_backbone(info), head).eval()
    return net, dict(net.model.named_modules())[layer]


def gradcam(model_dir: Path, inputs: list[Path], out: Path, limit: int = 8, device: str = "auto") -> dict:
    """Save each image (as the model sees it) above its Grad-CAM overlay."""
    info, state = modeldir.load(model_dir)
    dev = resolve_device(device)
    net, pool = differentiable(info, state)
    net.to(dev)
    pre = Preprocessing.from_dict(info["backbone"]["preprocessing"])
    transform = pre.transform()
    crop = type(transform)(transform.transforms[:2])        # resize + centre crop: what the model sees
    shown = []
    for path in _spread(image_files(inputs), limit):
        try:
            shown.append((path, read_image(path, pre.resize)[0]))
        except ImageError:
            continue
    if not shown:
        raise UserError("no readable image to show")
    maps, predicted = gradcam_maps(net, pool, torch.stack([transform(img) for _, img in shown]).to(dev))
    plt, fig, axes = _grid(len(shown), rows_per_item=2)
    cols = axes.shape[1]
    for i, ((path, img), heat, label) in enumerate(zip(shown, maps, predicted)):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        truth = _true_class(path, info["classes"])
        top.imshow(crop(img))
        top.set_title(f"{info['classes'][label]}" + (f"\ntrue: {truth}" if truth else ""), fontsize=8,
                      color="black" if truth is None else "green" if truth == info["classes"][label] else "red")
        bottom.imshow(crop(img))
        bottom.imshow(heat, cmap="jet", alpha=0.45)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"shown": len(shown)}
