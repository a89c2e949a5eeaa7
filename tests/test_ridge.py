"""The ridge classifier, added as one module of pipeline.heads.classifiers: its alpha is tuned on val, its
decision values are scored as such, and it exports as torch layers giving the same scores."""
import numpy as np
import torch
from sklearn.linear_model import RidgeClassifier
from sklearn.preprocessing import normalize

from pipeline.heads.settings import train_settings
from pipeline.heads.train import scores_of, train
from pipeline.models.directory import open_model
from pipeline.models.networks import head_module
from tests.conftest import synthetic_cache

CLASSES = ["a", "b", "c"]


def blobs(n_per_class: int, seed: int, dim: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(0, 1.0, (len(CLASSES), dim))
    y = np.repeat(np.arange(len(CLASSES)), n_per_class)
    return (centres[y] + rng.normal(0, 1.0, (len(y), dim)) + 2).astype(np.float32), y


def test_ridge_tunes_alpha_on_val_and_exports_its_decision_values(tmp_path):
    splits = {"train": blobs(20, 1), "val": blobs(10, 2), "test": blobs(10, 3)}
    cache = synthetic_cache(tmp_path / "f.h5", splits, CLASSES)
    metrics = train(cache, tmp_path / "m", train_settings("ridge", {"calibration": "none"}))
    search = metrics["search"]
    assert search["hyperparameter"] == "alpha" and len(search["scores"]) >= 7      # the grid, then a finer one
    alpha = metrics["hyperparameters"]["alpha"]
    X, y = normalize(splits["train"][0]), splits["train"][1]
    chosen = RidgeClassifier(alpha=alpha).fit(X, y)
    assert search["scores"][f"{alpha:g}"] == np.mean(chosen.predict(normalize(splits["val"][0])) == splits["val"][1])
    assert "log_loss" not in metrics     # its own decision values, not probabilities

    model = open_model(tmp_path / "m").model
    probe = blobs(5, 4)[0]
    with torch.no_grad():
        exported = head_module(model, len(CLASSES), "ridge")(torch.from_numpy(probe)).numpy()
    np.testing.assert_allclose(exported, scores_of(model, probe, len(CLASSES)), rtol=1e-4, atol=1e-5)


def test_a_binary_ridge_exports_both_columns(tmp_path):
    splits = {s: (X[y < 2], y[y < 2]) for s, (X, y) in
              {"train": blobs(20, 1), "val": blobs(10, 2), "test": blobs(10, 3)}.items()}
    cache = synthetic_cache(tmp_path / "f.h5", splits, CLASSES[:2])
    train(cache, tmp_path / "m", train_settings("ridge", {"alpha": 1.0, "preprocess": "none"}))
    model = open_model(tmp_path / "m").model
    probe = splits["test"][0]
    with torch.no_grad():
        exported = head_module(model, 2, "ridge")(torch.from_numpy(probe)).numpy()
    np.testing.assert_allclose(exported, scores_of(model, probe, 2), rtol=1e-4, atol=1e-5)
    assert (exported.argmax(1) == model.predict(probe)).all()
