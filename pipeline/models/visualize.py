"""Visual checks of a model directory (either kind): predictions on a grid of images, and Grad-CAM heat maps.

The true class of an image is its parent folder's name when that is one of the model's classes
(as in ROOT/test/CLASS/*.png); other images show the prediction alone. A multi-label model's prediction is
every class whose score reaches its threshold, shown without a true class. Both pictures show the same
images: `limit` of them (when there are that many readable ones), spread evenly over the sorted paths.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.folders import find_images
from pipeline.data.images import ImageError, read_image
from pipeline.models.directory import ModelDirectory, Network, open_model
from pipeline.runtime.devices import resolve_device
from pipeline.runtime.errors import InputError, check_minimums
from pipeline.runtime.files import check_owned, staged_folder

BATCH = 8   # images per forward (and, for Grad-CAM, backward) pass


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def sample(paths: list[Path], limit: int, shortest: int) -> list[tuple[Path, object]]:
    """(path, image) of `limit` readable images (fewer only when there are not enough), evenly spaced over
    the sorted paths so that a test folder shows every class; an unreadable pick is replaced by a later one."""
    spread = dict.fromkeys(np.linspace(0, len(paths) - 1, min(limit, len(paths))).round().astype(int).tolist())
    order = [*spread, *(i for i in range(len(paths)) if i not in spread)]
    chosen = []
    for i in order:
        try:
            chosen.append((i, read_image(paths[i], shortest)[0]))
        except ImageError:
            continue
        if len(chosen) == limit:
            break
    return [(paths[i], image) for i, image in sorted(chosen, key=lambda c: c[0])]


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


def _title(ax, predicted: str, truth: str | None, score: str = "") -> None:
    colour = "black" if truth is None else "green" if truth == predicted else "red"
    ax.set_title(f"{predicted}{score}" + (f"\ntrue: {truth}" if truth else ""), color=colour, fontsize=8)
    if colour == "red":
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set(color="red", linewidth=3)


def prediction_grid(model: ModelDirectory, shown: list, out: Path, device: torch.device) -> int:
    """Save a grid of the images titled with predicted (and true) class and score; returns how many are wrong."""
    transform = model.preprocessing.transform()
    score = model.scorer(device)
    with torch.inference_mode():
        scores = np.concatenate([score(torch.stack([transform(img) for _, img in shown[i:i + BATCH]]))
                                 for i in range(0, len(shown), BATCH)])
    plt, fig, axes = _grid(len(shown))
    wrong, thresholds = 0, model.thresholds
    for ax, (path, img), row in zip(axes.flat, shown, scores):
        if thresholds is not None:
            ax.imshow(img)
            _title(ax, ", ".join(model.classes[c] for c in np.argsort(-row) if row[c] >= thresholds[c]) or "none",
                   None)
            continue
        predicted, truth = model.classes[int(row.argmax())], _true_class(path, model.classes)
        wrong += truth is not None and truth != predicted
        ax.imshow(img)
        _title(ax, predicted, truth, f" {row.max():.2f}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return int(wrong)


def gradcam_maps(net: torch.nn.Module, pool: torch.nn.Module, images: torch.Tensor, target: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM (Selvaraju et al.) for the top-scoring class (or class index `target`): the feature map
    entering the global-pool module `pool`, weighted by the spatially averaged gradient of the class score.
    Returns (maps in [0, 1] at the input size, the classes mapped)."""
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
        raise InputError(f"Grad-CAM needs a spatial feature map entering the feature layer, found shape "
                        f"{tuple(fmap.shape)}")
    predicted = scores.argmax(1) if target is None else torch.full((len(scores),), target, device=scores.device)
    grads, = torch.autograd.grad(scores.gather(1, predicted[:, None]).sum(), fmap)
    cam = torch.relu((grads.mean((2, 3), keepdim=True) * fmap).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.flatten(1).max(1).values.clamp_min(1e-8)[:, None, None]
    return cam.detach().cpu().numpy(), predicted.cpu().numpy()


def gradcam_grid(model: ModelDirectory, network: Network, shown: list, out: Path, device: torch.device,
                 target: int | None = None) -> None:
    """Save each image (as the model sees it) above its Grad-CAM overlay (of class index `target`, or of its
    top-scoring class)."""
    net = network.module.to(device)
    transform = model.preprocessing.transform()
    crop = model.preprocessing.resize_crop        # what the model sees
    maps, predicted = [], []
    for i in range(0, len(shown), BATCH):
        batch = torch.stack([transform(img) for _, img in shown[i:i + BATCH]]).to(device)
        heat, labels = gradcam_maps(net, network.feature_layer, batch, target)
        maps.append(heat)
        predicted.append(labels)
    plt, fig, axes = _grid(len(shown), rows_per_item=2)
    cols = axes.shape[1]
    for i, ((path, img), heat, label) in enumerate(zip(shown, np.concatenate(maps), np.concatenate(predicted))):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        top.imshow(crop(img))
        judged = target is None and model.thresholds is None   # the top class of a single-label model
        _title(top, model.classes[label], _true_class(path, model.classes) if judged else None)
        bottom.imshow(crop(img))
        bottom.imshow(heat, cmap="jet", alpha=0.45)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def visualize(model_dir: Path, inputs: list[Path], out: Path, limit: int = 24, gradcam: bool = False,
              device: str = "auto", gradcam_class: str | None = None) -> dict:
    """predictions.png and, with `gradcam`, gradcam.png of the same images in folder `out` (Grad-CAM of
    `gradcam_class` for every image, or of each one's top-scoring class). Everything is checked (model,
    Grad-CAM's network and class, readable images) before anything is written."""
    check_minimums({"limit": 1}, {"limit": limit})
    check_owned(out, "visualization")
    model = open_model(model_dir)
    if gradcam_class is not None and gradcam_class not in model.classes:
        raise InputError(f"--gradcam-class {gradcam_class} is not a class of {model_dir}: "
                         f"{', '.join(model.classes)}")
    target = None if gradcam_class is None else model.classes.index(gradcam_class)
    dev = resolve_device(device)
    network = model.network() if gradcam else None
    if network is not None and network.feature_layer is None:
        raise InputError(f"Grad-CAM needs a spatial feature map; the features of {model_dir} are the "
                        f"transformer tokens {model.backbone_spec.layer}")
    shown = sample([path for path, reason in find_images(inputs) if reason is None], limit,
                   model.preprocessing.resize)
    if not shown:
        raise InputError(f"no readable image in {', '.join(map(str, inputs))}")
    with staged_folder(out, "visualization") as folder:   # written whole; the grids save into the fresh folder
        wrong = prediction_grid(model, shown, folder / "predictions.png", dev)
        if network is not None:
            gradcam_grid(model, network, shown, folder / "gradcam.png", dev, target)
    return {"shown": len(shown), "wrong": wrong}
