"""Export a trained model directory, either kind, as one deployable file: the network from images to scores.

The exported network maps a batch of preprocessed images [N, 3, H, W] (resized, centre-cropped and
normalised as recorded in model.json: see docs/classifiers.md, "Export") to scores [N, classes], the same scores
`pipeline predict` ranks: probabilities for fine-tuned models and calibrated heads, else the head's own
scores (decision values for heads without probabilities). Classifiers on cached features become the frozen
backbone, the feature preprocessing, the head and its calibration (pipeline.heads.calibration); heads that are not tensor operations (their spec has no `to_torch`) cannot be exported.

  .pt2   torch.export program: torch.export.load(path).module()(images)
  .onnx  ONNX graph with input `images` and output `scores`
Both carry classes and the image preprocessing recipe as metadata (`model.json`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline.models.directory import open_model
from pipeline.runtime.errors import InputError
from pipeline.runtime.files import replaced_atomically

FORMATS = (".pt2", ".onnx")


def export(model_dir: Path, out: Path) -> Path:
    """Write `out` (.pt2 or .onnx) holding the network of `model_dir`, from images to scores."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise InputError(f"--out must end in {' or '.join(FORMATS)}, got {out.name}")
    model = open_model(model_dir)
    network = model.network().module
    size = model.preprocessing.image_size
    example = torch.zeros(2, 3, size, size)
    meta = json.dumps({"classes": model.classes, "approach": model.approach, "scores": model.scores,
                       "preprocessing": model.preprocessing.to_dict(),
                       "fingerprint": model.cache_fingerprint,
                       **({"multi_label": True, "thresholds": model.info["thresholds"]}
                          if model.info.get("multi_label") else {})})
    with replaced_atomically(out) as tmp, torch.no_grad():
        if out.suffix == ".pt2":
            program = torch.export.export(network, (example,),
                                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            torch.export.save(program, tmp, extra_files={"model.json": meta})
        else:
            _export_onnx(network, example, tmp, meta)
    return out


def _export_onnx(network: nn.Module, example: torch.Tensor, path: Path, meta: str) -> None:
    """As the CPU engine exports (pipeline.features.engines.onnx_runtime): TensorFlow-style padding as constants that ONNX
    Runtime folds into the convolutions."""
    import onnx

    from pipeline.features.engines.onnx_runtime import drop_empty_pad_inputs, static_same_padding
    static_same_padding(network, example.shape[-1])
    # The TorchScript-based exporter: the torch.export-based one needs the extra onnxscript package.
    torch.onnx.export(network, (example,), str(path), input_names=["images"], output_names=["scores"],
                      dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}}, dynamo=False)
    graph = onnx.load(str(path))
    drop_empty_pad_inputs(graph)
    onnx.helper.set_model_props(graph, {"model.json": meta})
    onnx.save(graph, str(path))
