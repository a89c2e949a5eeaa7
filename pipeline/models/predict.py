"""Predict classes of new images with a model directory (backbone + head, or a fine-tuned network), top-k."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.data.folders import find_images, printable
from pipeline.data.images import ImageError, read_image
from pipeline.features.backbones import Backbone, Preprocessing, load_backbone
from pipeline.features.engine import embedder
from pipeline.features.spec import BackboneSpec
from pipeline.heads.train import scores_of
from pipeline.runtime.devices import resolve_device
from pipeline.runtime.errors import UserError, check_minimums
from pipeline.storage import modeldir


def model_backbone(info: dict) -> Backbone:
    """The backbone recorded in a model's model.json, refusing weights other than those it was trained on."""
    spec = BackboneSpec.from_dict(info["backbone"])
    backbone = load_backbone(spec.name, spec.weights, spec.layer, spec.preprocessing.image_size, spec.tta)
    if backbone.weights_sha256 != spec.weights_sha256:
        raise UserError(f"weights {spec.weights} differ from those the model was trained on "
                        f"(SHA-256 {backbone.weights_sha256[:12]} != {spec.weights_sha256[:12]})")
    return replace(backbone, preprocessing=spec.preprocessing)


def scorer(info: dict, model, dev: torch.device, engine: str = "auto", log=None):
    """fn(batch of preprocessed images) -> scores [N, classes] for either kind of model directory. `log`
    receives a line naming the engine the backbone runs on, and notes (an export, a fallback to torch)."""
    if info["kind"] == "finetuned":
        from pipeline.finetune.training import network
        net = network(info, model).to(dev)
        return lambda x: torch.softmax(net(x.to(dev)).float(), 1).cpu().numpy()
    backbone = model_backbone(info)
    embed, engine, notes = embedder(backbone, dev, engine)
    for line in [f"predict: {dev}, {engine}", *notes] if log else []:
        log(line)
    return lambda x: scores_of(model, embed(x)[backbone.layer], len(info["classes"]))


def predict(model_dir: Path, inputs: list[Path], top_k: int = 5, device: str = "auto",
            batch_size: int = 32, engine: str = "auto", log=None) -> list[dict]:
    """One result per file: {path, top: [{class, score}, ...]} or {path, error} (also for the files of a
    folder that are not images, as `extract` reports them). `engine` and `log` as for `scorer`."""
    check_minimums({"top_k": 1}, {"top_k": top_k})
    info, model = modeldir.load(model_dir)
    files = find_images(inputs)
    if not any(reason is None for _, reason in files):
        raise UserError(f"no image files in {', '.join(map(str, inputs))}")
    pre = Preprocessing.from_dict(info["backbone"]["preprocessing"])
    transform = pre.transform()
    score = scorer(info, model, resolve_device(device), engine, log)
    results: list[dict] = [{"path": printable(str(p))} | ({"error": reason} if reason else {})
                           for p, reason in files]     # in input order
    batch: list[tuple[int, torch.Tensor]] = []

    def flush():
        with torch.inference_mode():
            scores = score(torch.stack([t for _, t in batch]))
        for (i, _), row in zip(batch, scores):
            results[i]["top"] = [{"class": info["classes"][c], "score": float(row[c])}
                                 for c in np.argsort(-row)[:top_k]]
        batch.clear()

    for i, (path, reason) in enumerate(files):
        if reason:
            continue
        try:
            batch.append((i, transform(read_image(path, pre.resize)[0])))
        except ImageError as exc:
            results[i]["error"] = str(exc)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return results
