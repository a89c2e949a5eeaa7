"""OpenVINO, timed beside ONNX Runtime by `pipeline bench` on the same exported graph (the model alone; it is
not an engine of `extract`). Installed separately: `pip install openvino`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from pipeline.features.engines.onnx_runtime import ExportCache, export_key, onnxruntime_threads

if TYPE_CHECKING:
    import numpy as np

    from pipeline.features.backbones.loading import Backbone


def openvino_runner(backbone: Backbone, images: np.ndarray) -> Callable[[int], list]:
    """fn(batches) running the ONNX export of `backbone` (already exported) through OpenVINO on the CPU, with
    as many threads as ONNX Runtime uses, over `images` that many times."""
    import openvino
    compiled = openvino.Core().compile_model(str(ExportCache().paths(export_key(backbone))[0]), "CPU", {
        "INFERENCE_NUM_THREADS": onnxruntime_threads(), "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda batches: [request.infer({0: images}) for _ in range(batches)]
