"""The ONNX Runtime engine: the same vectors as the torch path (several backbones, layers, TTA), one export
per key reused from the cache folder, damaged or disagreeing cached files replaced, and torch as the
fallback when an export cannot be used."""
import json
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from pipeline.features.engines import onnx_runtime as engine
from pipeline.features.backbones.loading import Backbone, Preprocessing, build_backbone
from pipeline.features.engines.torch import Embedder
from pipeline.features.engines.onnx_runtime import ExportCache, embedder, onnx_embedder
from tests.conftest import cli_in_process, make_image_folder


def assert_same_vectors(backbone: Backbone, images: torch.Tensor) -> None:
    """ONNX Runtime's vectors equal torch's to the folding tolerance, every layer."""
    onnx_embed, used, notes = embedder(backbone, "cpu", "onnxruntime")
    assert used == "onnxruntime", notes
    with Embedder(backbone) as torch_embed:
        want = torch_embed(images)
    got = onnx_embed(images)
    assert list(got) == list(backbone.layers)
    for layer in backbone.layers:
        assert got[layer].shape == want[layer].shape
        np.testing.assert_allclose(got[layer], want[layer], rtol=0,
                                   atol=engine.TOLERANCE * np.abs(want[layer]).max())


def random_images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name, weights, layers, size, tta", [
    ("efficientnet_lite0", "imagenet", None, 64, False),
    ("efficientnet_lite0", "imagenet", ["global_pool", "blocks.3", "conv_head"], 64, True),
    ("resnet18", "none", ["avgpool", "layer2"], 64, True),
    ("timm/test_efficientnet", "none", None, 64, False),
])
def test_onnxruntime_gives_the_torch_vectors(name, weights, layers, size, tta):
    assert_same_vectors(build_backbone(name, weights, layers, size, tta), random_images(3, size))


def test_flattened_layers_too():
    resnet = build_backbone("resnet18", "none", ["avgpool", "layer4"], 64)
    assert_same_vectors(replace(resnet, flattened=("layer4",)), random_images(2, 64))   # 512 x 2 x 2 -> 2048


def test_lite0_padding_is_folded_into_its_convolutions(tmp_path):
    """EfficientNet-Lite's TensorFlow-style padding is exported as constants that ONNX Runtime folds into the
    convolutions: its optimised graph has no Pad left (with one, it spent a quarter of its time around it)."""
    import onnx
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(engine.export(build_backbone("efficientnet_lite0", "imagenet", None, 64)), options,
                                 providers=["CPUExecutionProvider"])
    operators = {node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert "Conv" in operators and "Pad" not in operators


@pytest.fixture
def tiny():
    """timm's smallest EfficientNet: the cache's behaviour does not depend on the network's size."""
    return build_backbone("timm/test_efficientnet", "none", None, 32)


@pytest.fixture(scope="module")
def tiny_export() -> tuple[bytes, dict]:
    tiny = build_backbone("timm/test_efficientnet", "none", None, 32)
    return engine.export(tiny), engine.torch_reference(tiny)


def exported(notes: list[str]) -> int:
    return sum("exported" in note for note in notes)


def test_the_export_is_reused_and_redone_when_its_key_changes(tiny, tmp_path):
    cache = ExportCache(tmp_path)
    first, notes = onnx_embedder(tiny, cache=cache)
    assert first and exported(notes) == 1
    graph, record = cache.paths(engine.export_key(tiny))
    stamp = graph.stat().st_mtime_ns
    second, notes = onnx_embedder(tiny, cache=cache)
    assert second and notes == [] and graph.stat().st_mtime_ns == stamp

    other = build_backbone("timm/test_efficientnet", "none", ["global_pool", "blocks.1"], 32)
    embed, notes = onnx_embedder(other, cache=cache)
    assert embed and exported(notes) == 1 and len(list(tmp_path.glob("*.onnx"))) == 2

    kept = json.loads(record.read_text())           # a record of other library versions under this name
    kept["key"]["versions"]["onnxruntime"] = "0.0.1"
    record.write_text(json.dumps(kept))
    embed, notes = onnx_embedder(tiny, cache=cache)
    assert embed and exported(notes) == 1 and "names another key" in notes[0]
    assert json.loads(record.read_text())["key"] == engine.export_key(tiny)


@pytest.mark.parametrize("damage", ["truncated", "bytes changed", "record lost"])
def test_a_damaged_cached_export_is_replaced(tiny, tiny_export, tmp_path, damage):
    cache = ExportCache(tmp_path)
    key = engine.export_key(tiny)
    graph, record = cache.paths(key)
    good, reference = tiny_export
    cache.save(key, good, reference)
    assert cache.load(key)[0] == good
    if damage == "truncated":
        graph.write_bytes(good[:len(good) // 2])
    elif damage == "bytes changed":
        graph.write_bytes(good[:-100] + bytes(100))
    else:
        record.unlink()
    damaged = graph.read_bytes()
    embed, notes = onnx_embedder(tiny, cache=cache)
    assert embed and exported(notes) == 1 and "not used" in notes[0]
    assert cache.load(key)[::2] == (graph.read_bytes(), None)
    assert damage == "record lost" or graph.read_bytes() != damaged


def test_a_cached_export_that_disagrees_with_torch_is_replaced(tiny, tiny_export, tmp_path):
    """Bytes that match their record but not the network (a weight changed) are not trusted."""
    import onnx
    from onnx import numpy_helper
    good, reference = tiny_export
    graph = onnx.load_from_string(good)
    weight = max(graph.graph.initializer, key=lambda w: np.prod(w.dims))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2, weight.name))
    cache, key = ExportCache(tmp_path), engine.export_key(tiny)
    cache.save(key, graph.SerializeToString(), reference)
    embed, notes = onnx_embedder(tiny, cache=cache)
    assert embed and exported(notes) == 1 and "differs from torch's" in notes[0]
    assert engine.mismatch(embed, engine.torch_reference(tiny), 32) is None


class Noisy(nn.Module):
    """Adds fresh noise in its forward pass: ONNX Runtime draws other numbers than torch."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.conv(x) + torch.rand(1))


def test_an_export_that_disagrees_or_fails_falls_back_to_torch(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pre = Preprocessing(16, 16, "bilinear", (0.5,) * 3, (0.5,) * 3)
    noisy = Backbone("noisy", Noisy().eval(), ("pool",), {"pool": 4}, pre, "none", "none")
    embed, used, notes = embedder(noisy, "cpu", "auto")
    assert isinstance(embed, Embedder) and used == "torch"
    assert notes[-1].startswith("onnxruntime: layer pool differs from torch's") and notes[-1].endswith("running torch")

    small_vgg = build_backbone("vgg16", "none", None, 32)    # adaptive pooling of 1x1 to 7x7: not exportable
    embed, used, notes = embedder(small_vgg, "cpu", "auto")
    assert isinstance(embed, Embedder) and used == "torch" and len(notes) == 1
    assert notes[0].startswith("onnxruntime: export failed (") and notes[0].endswith("running torch")
    printed = capfd.readouterr()
    assert "graph" not in printed.out + printed.err     # the exporter's dump of the failed graph is not shown


@pytest.mark.slow
def test_extract_runs_onnxruntime_on_a_cpu_with_the_torch_vectors(tmp_path, monkeypatch):
    """The command line: the run line names the engine; one export, reused by the next run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = make_image_folder(tmp_path / "images", {"train": 3, "val": 1})
    common = ["--image-size", 48, "--dtype", "float32", "--device", "cpu", "--no-reuse", "--tta"]
    runs = {engine_name: cli_in_process("extract", data, "--out", tmp_path / f"{engine_name}.h5", *common,
                                 "--engine", engine_name, check=True)
            for engine_name in ("auto", "torch", "onnxruntime")}
    assert "images/s on cpu, onnxruntime, PIL decoding" in runs["auto"].stderr
    assert "images/s on cpu, torch, PIL decoding" in runs["torch"].stderr
    assert runs["auto"].stderr.count("onnxruntime: exported") == 1
    assert "images/s on cpu, onnxruntime" in runs["onnxruntime"].stderr and "exported" not in runs["onnxruntime"].stderr
    with h5py.File(tmp_path / "auto.h5") as got, h5py.File(tmp_path / "torch.h5") as want:
        for split in ("train", "val"):
            expected = want[split]["features"][:]
            np.testing.assert_allclose(got[split]["features"][:], expected, rtol=0,
                                       atol=engine.TOLERANCE * np.abs(expected).max())


def test_onnxruntime_on_cuda_or_in_bfloat16_is_refused_before_writing(tmp_path):
    data = make_image_folder(tmp_path / "images", {"train": 2, "val": 1})
    proc = cli_in_process("extract", data, "--out", tmp_path / "f.h5", "--engine", "onnxruntime", "--device", "cpu",
                   "--precision", "bfloat16")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --engine onnxruntime")
    assert list(tmp_path.iterdir()) == [tmp_path / "images"]
