"""`pipeline export`: backbone + feature preprocessing + head in one file that ranks images exactly
as `pipeline predict` does."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from pipeline.data.images import read_image
from pipeline.features.backbones.loading import Preprocessing
from pipeline.heads.settings import train_settings
from pipeline.heads.train import scores_of, train
from pipeline.models.directory import open_model
from pipeline.models.export import export
from pipeline.models.networks import head_module
from pipeline.models.predict import predict
from pipeline.runtime.errors import InputError
from pipeline.storage.cache import open_cache
from tests.conftest import COLOURS, cli_in_process, synthetic_cache, tiny_image

FIXED = {"logreg": {"C": 1.0}, "torch_logreg": {"C": 1.0}, "linear_svm": {"C": 1.0},
         "torch_linear": {"weight_decay": 1e-3, "epochs": 10},
         "torch_mlp": {"weight_decay": 1e-3, "epochs": 10, "hidden": 16, "depth": 2}}


@pytest.mark.parametrize("classifier, preprocess, n_classes", [
    ("logreg", "l2", 2), ("logreg", "standardize", 4), ("torch_logreg", "l2", 2), ("torch_logreg", "none", 4),
    ("linear_svm", "none", 2), ("linear_svm", "l2", 4),
    ("torch_linear", "standardize", 4), ("torch_mlp", "l2", 2), ("torch_mlp", "none", 4)])
def test_head_as_torch_layers_gives_the_scores_of_the_fitted_head(tmp_path, classifier, preprocess, n_classes):
    """Binary heads (one decision column in sklearn) and a class seen only in test (a filled column)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 2, (n_classes, 6))

    def split(labels):
        y = np.array(labels)
        return (centres[y] + rng.normal(0, 1, (len(y), 6)) + 3).astype(np.float32), y
    seen = list(range(max(2, n_classes - 1))) * 10          # with 4 classes, the last is never trained on
    cache = synthetic_cache(tmp_path / "f.h5", {"train": split(seen), "val": split(seen),
                                                 "test": split(list(range(n_classes)) * 3)},
                            [f"k{i}" for i in range(n_classes)])
    train(cache, tmp_path / "m", train_settings(classifier, {**FIXED[classifier], "preprocess": preprocess}))
    model = open_model(tmp_path / "m").model
    X = split(list(range(n_classes)) * 5)[0]
    with torch.no_grad():
        got = head_module(model, n_classes, classifier)(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(got, scores_of(model, X, n_classes), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def images(small_cache, tmp_path_factory) -> list[Path]:
    """The cache's test images and new ones."""
    new = tmp_path_factory.mktemp("export_images")
    for name, colour in COLOURS.items():
        tiny_image(colour, 2000, size=80).save(new / f"{name}.png")
    test = open_cache(small_cache).read("test")
    return [small_cache.parent / "images" / p for p in test.paths] + sorted(new.iterdir())


def run_exported(path: Path, images: list[Path]) -> tuple[np.ndarray, dict]:
    """Scores of the exported file, with images prepared by the recipe stored in it."""
    if path.suffix == ".pt2":
        extra = {"model.json": ""}
        program = torch.export.load(path, extra_files=extra)
        meta = json.loads(extra["model.json"])
    else:
        graph = onnx.load(path)
        meta = json.loads({p.key: p.value for p in graph.metadata_props}["model.json"])
    transform = Preprocessing.from_dict(meta["preprocessing"]).transform()
    x = torch.stack([transform(read_image(p)[0]) for p in images])
    if path.suffix == ".pt2":
        with torch.no_grad():
            return program.module()(x).numpy(), meta
    return ReferenceEvaluator(graph).run(None, {"images": x.numpy()})[0], meta


@pytest.mark.parametrize("classifier, suffix", [("logreg", ".pt2"), ("torch_mlp", ".onnx")])
def test_exported_model_ranks_images_as_predict_does(small_cache, images, tmp_path, classifier, suffix):
    model = tmp_path / classifier
    settings = {**FIXED[classifier], "preprocess": "standardize" if classifier == "torch_mlp" else "l2"}
    train(small_cache, model, train_settings(classifier, settings))
    out = export(model, tmp_path / f"model{suffix}")
    assert out.is_file() and not list(tmp_path.glob("*.tmp*"))

    scores, meta = run_exported(out, images)
    assert meta["classes"] == sorted(COLOURS) and meta["scores"] == "probabilities"
    predicted = predict(model, images, top_k=3, device="cpu")
    assert [r["top"][0]["class"] for r in predicted] == [meta["classes"][i] for i in scores.argmax(1)]
    for r, row in zip(predicted, scores):
        np.testing.assert_allclose([t["score"] for t in r["top"]], np.sort(row)[::-1], atol=1e-4)


def test_heads_without_a_tensor_form_are_refused(small_cache, tmp_path):
    train(small_cache, tmp_path / "knn", train_settings("knn", {"n_neighbors": 3}))
    proc = cli_in_process("export", tmp_path / "knn", "--out", tmp_path / "knn.pt2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: a knn head is not made of tensor operations")
    assert not (tmp_path / "knn.pt2").exists()
    train(small_cache, tmp_path / "rbf", train_settings("rbf_svm", {"C": 1.0}))
    with pytest.raises(InputError, match="a rbf_svm head is not made of tensor operations"):
        export(tmp_path / "rbf", tmp_path / "rbf.onnx")
    with pytest.raises(InputError, match="must end in .pt2 or .onnx"):
        export(tmp_path / "rbf", tmp_path / "model.pt")
