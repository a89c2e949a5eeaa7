"""Calibrated scores and the familiarity of new images (pipeline.heads.calibration, .familiarity)."""
from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from pipeline.heads import calibration, familiarity
from pipeline.heads.settings import train_settings
from pipeline.heads.train import scores_of, train
from pipeline.models.directory import open_model
from pipeline.models.predict import predict
from pipeline.runtime.errors import InputError
from pipeline.storage.cache import open_cache
from tests.conftest import cli_in_process, synthetic_cache


def sampled(temperature: float, n: int = 20000, classes: int = 5, seed: int = 0):
    """Logits, and labels drawn from softmax(logits / temperature): the temperature that calibrates them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, classes))
    p = calibration.softmax(z, temperature)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z, y


def test_the_fitted_temperature_is_the_one_that_made_the_labels_and_keeps_top1():
    z, y = sampled(2.5)
    t = calibration.fit_temperature(z, y)
    assert abs(t - 2.5) < 0.15
    assert (calibration.softmax(z, t).argmax(1) == z.argmax(1)).all()


def test_calibration_error_is_small_for_calibrated_scores_and_large_for_overconfident_ones():
    z, y = sampled(1.0)
    table = calibration.reliability(calibration.softmax(z), y)
    assert len(table) == calibration.BINS and sum(row["count"] for row in table) == len(y)
    assert calibration.expected_calibration_error(table) < 0.02
    overconfident = calibration.reliability(calibration.softmax(z, 0.3), y)
    assert calibration.expected_calibration_error(overconfident) > 0.1


def test_logits_keep_unseen_classes_impossible():
    probabilities = np.array([[0.7, 0.3, 0.0]])
    decisions = np.array([[1.5, -0.5, -np.inf]])
    for scores, kind in ((probabilities, True), (decisions, False)):
        p = calibration.softmax(calibration.logits(scores, kind), 2.0)
        assert np.isfinite(p).all() and p[0, 2] < 1e-2 and p.argmax() == 0


def test_nearest_similarities_in_blocks_match_an_exhaustive_search(monkeypatch):
    rng = np.random.default_rng(1)
    reference = familiarity.unit_rows(rng.normal(size=(300, 16)))
    queries = familiarity.unit_rows(rng.normal(size=(70, 16)))
    monkeypatch.setattr(familiarity, "BLOCK", 32)   # several blocks
    sims = familiarity.nearest_similarities(queries, reference, 5)
    distances, _ = NearestNeighbors(n_neighbors=5, metric="cosine").fit(reference).kneighbors(queries)
    np.testing.assert_allclose(sims, 1 - distances, atol=1e-5)


def test_images_of_another_domain_are_unfamiliar_and_the_threshold_keeps_the_quantile():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(4, 32)) * 3
    near = lambda n: centres[rng.integers(0, 4, n)] + rng.normal(size=(n, 32))   # noqa: E731
    model = familiarity.Familiarity.fit(near(400), near(200), quantile=0.9)
    assert abs(np.mean(model.familiar(model.novelty(near(2000)))) - 0.9) < 0.05
    far = rng.normal(size=(200, 32)) * 3
    assert not model.familiar(model.novelty(far)).any()


@pytest.fixture(scope="module")
def models(small_cache, tmp_path_factory) -> dict[str, Path]:
    """logreg on a real Lite0 cache, calibrated and not, and a calibrated linear SVM."""
    root = tmp_path_factory.mktemp("calibrated")
    runs = {"logreg": ("logreg", "temperature"), "logreg_none": ("logreg", "none"),
            "linear_svm": ("linear_svm", "temperature")}
    for name, (classifier, method) in runs.items():
        train(small_cache, root / name, replace(train_settings(classifier, {"C": 10}), calibration=method))
    return {name: root / name for name in runs}


def test_training_records_calibration_and_keeps_top1(models, small_cache):
    calibrated = json.loads((models["logreg"] / "metrics.json").read_text())
    plain = json.loads((models["logreg_none"] / "metrics.json").read_text())
    assert calibrated["ece"] <= calibrated["ece_uncalibrated"] + 1e-9
    assert plain["ece"] == pytest.approx(plain["ece_uncalibrated"]) == pytest.approx(calibrated["ece_uncalibrated"])
    assert calibrated["top1"] == plain["top1"]
    table = json.loads((models["logreg"] / "details.json").read_text())["reliability"]
    assert len(table) == calibration.BINS and sum(row["count"] for row in table) == calibrated["n_eval"]
    assert (models["logreg"] / "reliability.png").stat().st_size > 1000
    info = json.loads((models["logreg"] / "model.json").read_text())
    assert info["calibration"]["method"] == "temperature" and info["calibration"]["value"] > 0
    assert "calibration" not in json.loads((models["logreg_none"] / "model.json").read_text())
    test = open_cache(small_cache).read("test")
    model = open_model(models["logreg"])
    raw = scores_of(model.model, test.features, len(model.classes))
    calibrated_scores = model.calibration.apply(raw)
    assert (calibrated_scores.argmax(1) == raw.argmax(1)).all()
    np.testing.assert_allclose(calibrated_scores.sum(1), 1.0)


def test_predict_gives_calibrated_probabilities_familiar_and_novelty(models, small_cache):
    test = open_cache(small_cache).read("test")
    paths = [small_cache.parent / "images" / p for p in test.paths]
    model = open_model(models["linear_svm"])
    assert model.scores == "probabilities"       # a calibrated SVM's decision values become probabilities
    results = predict(models["linear_svm"], paths, top_k=3)
    expected = model.calibration.apply(scores_of(model.model, test.features, len(model.classes)))
    novelty = model.familiarity.novelty(model.model[0].transform(test.features))
    for r, row, score in zip(results, expected, novelty):
        assert r["scores"] == "probabilities"
        assert r["top"][0]["score"] == pytest.approx(row.max(), abs=1e-3)
        assert r["novelty"] == pytest.approx(score, abs=1e-3)
        assert r["familiar"] is bool(score <= model.novelty_threshold)
    with np.load(models["linear_svm"] / familiarity.FILE, allow_pickle=False) as arrays:
        assert arrays["reference"].dtype == np.float16
        assert len(arrays["reference"]) == len(open_cache(small_cache).read("train").labels)


def test_predict_marks_unfamiliar_images_in_each_format(models, tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    as_json = json.loads(cli_in_process("predict", models["logreg"], tmp_path, "--format", "json").stdout)
    assert as_json[0]["familiar"] is False and as_json[0]["novelty"] > 0
    rows = list(csv.DictReader(io.StringIO(cli_in_process("predict", models["logreg"], tmp_path,
                                                          "--format", "csv").stdout)))
    assert rows[0]["familiar"] == "false"
    assert float(rows[0]["novelty"]) == pytest.approx(as_json[0]["novelty"], abs=1e-4)
    assert "unfamiliar" in cli_in_process("predict", models["logreg"], tmp_path).stdout


def test_without_a_test_split_the_temperature_is_fitted_on_out_of_fold_scores(tmp_path, monkeypatch):
    """Train/val layouts: the held-out scores are each training image's, from the fold that left it out; the
    novelty threshold keeps the quantile asked for of the val images."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 16)) * 2

    def split(n):
        y = np.arange(n) % 3
        return (centres[y] + rng.normal(size=(n, 16)) * 1.5).astype(np.float32), y
    cache = synthetic_cache(tmp_path / "f.h5", {"train": split(90), "val": split(60)}, ["a", "b", "c"])
    fitted = []
    real_fit = calibration.Temperature.fit
    monkeypatch.setattr(calibration.Temperature, "fit",
                        classmethod(lambda cls, held, y, *a: fitted.append(len(y)) or real_fit(held, y, *a)))
    s = replace(train_settings("logreg", {"C": 1.0}), novelty_quantile=0.5)
    metrics = train(cache, tmp_path / "m", s)
    assert fitted == [90] and metrics["eval_split"] == "val"
    model = open_model(tmp_path / "m")
    val = open_cache(cache).read("val")
    familiar = model.familiarity.familiar(model.familiarity.novelty(model.model[0].transform(val.features)))
    assert familiar.mean() == pytest.approx(0.5, abs=0.02)


def test_a_calibration_no_fit_gives_is_refused(models, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(models["logreg"], edited)
    info = json.loads((edited / "model.json").read_text())
    (edited / "model.json").write_text(json.dumps({**info, "calibration": {**info["calibration"], "value": 0}}))
    with pytest.raises(InputError, match="'calibration' is malformed"):
        open_model(edited).calibration
