"""Predict classes of new images with a model directory (backbone + head, or a fine-tuned network), top-k."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.folders import find_images, printable
from pipeline.data.images import ImageError, read_image
from pipeline.models.directory import ModelDirectory, open_model
from pipeline.runtime.devices import resolve_device
from pipeline.runtime.errors import InputError, check_minimums


def predict(model_dir: Path, inputs: list[Path], top_k: int = 5, device: str = "auto",
            batch_size: int = 32, engine: str = "auto", log=None) -> list[dict]:
    """One result per file: {path, scores: "probabilities" or "decision values", top: [{class, score}, ...],
    and, where the model records its training vectors, familiar (true/false) and novelty} or {path, error}
    (also for the files of a folder that are not images, as `extract` reports them).
    `engine` and `log` as for `ModelDirectory.scorer`."""
    check_minimums({"top_k": 1}, {"top_k": top_k})
    return predict_images(open_model(model_dir), inputs, top_k, device, batch_size, engine, log)


def predict_images(model: ModelDirectory, inputs: list[Path], top_k: int = 5, device: str = "auto",
                   batch_size: int = 32, engine: str = "auto", log=None) -> list[dict]:
    """`predict` with a model already open."""
    check_minimums({"top_k": 1}, {"top_k": top_k})
    files = find_images(inputs)
    if not any(reason is None for _, reason in files):
        raise InputError(f"no image files in {', '.join(map(str, inputs))}")
    pre = model.preprocessing
    transform = pre.transform()
    assess = model.assessor(resolve_device(device), engine, log)
    threshold = model.novelty_threshold
    thresholds = getattr(model, "thresholds", None)
    results: list[dict] = [{"path": printable(str(p))} | ({"error": reason} if reason else {})
                           for p, reason in files]     # in input order
    batch: list[tuple[int, torch.Tensor]] = []

    def flush():
        with torch.inference_mode():
            scores, novelty = assess(torch.stack([t for _, t in batch]))
        for j, ((i, _), row) in enumerate(zip(batch, scores)):
            results[i]["scores"] = model.scores
            results[i]["top"] = [{"class": model.classes[c], "score": float(row[c])}
                                 for c in np.argsort(-row)[:top_k]]
            if thresholds is not None:   # multi-label: every class whose score reaches its threshold
                results[i]["labels"] = [{"class": model.classes[c], "score": float(row[c])}
                                        for c in np.argsort(-row) if row[c] >= thresholds[c]]
            if novelty is not None:
                results[i].update(familiar=bool(novelty[j] <= threshold), novelty=float(novelty[j]))
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
