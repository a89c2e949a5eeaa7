"""The Python API (`import pipeline`): its names, its objects and its refusals, in this process."""
import importlib
import json
import pkgutil
import shutil
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import RidgeClassifier
from sklearn.svm import LinearSVC

import pipeline
from pipeline.runtime.files import sha256_file
from tests.conftest import ROOT, cli_in_process, make_image_folder
from tests.test_integrity import is_pickle

API = ("extract", "open_cache", "train", "load_model", "compare", "audit", "finetune")


def test_the_api_names_stay_functions_after_every_submodule_is_imported():
    for module in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        if module.name not in ("pipeline.__main__",):
            importlib.import_module(module.name)
    for name in API:
        assert callable(getattr(pipeline, name)) and getattr(pipeline, name).__module__ == "pipeline.api", name
    assert issubclass(pipeline.InputError, ValueError)


def test_import_pipeline_loads_neither_torch_nor_sklearn():
    code = "import sys, pipeline; print(sorted({'torch', 'sklearn', 'h5py', 'typer'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "[]"


def test_open_cache_reads_what_train_reads(small_cache):
    cache = pipeline.open_cache(small_cache)
    assert cache.classes == ["blue", "green", "red"] and cache.splits == ["train", "val", "test"]
    X, y = cache.arrays("val")
    assert X.dtype == np.float32 and X.shape == (12, 1280) and y.dtype.kind == "i" and set(y) == {0, 1, 2}
    assert len(cache.paths("val")) == 12 and cache.paths("val")[0].startswith("val/")
    assert cache.attrs["backbone"] == "efficientnet_lite0" and cache.summary is None
    assert "3 classes" in repr(cache) and "train 24" in repr(cache)
    with pytest.raises(pipeline.InputError, match="no split 'holdout'"):
        cache.arrays("holdout")


def test_a_missing_or_foreign_cache_is_an_input_error(tmp_path):
    with pytest.raises(pipeline.InputError, match="does not exist; run `pipeline extract` first"):
        pipeline.open_cache(tmp_path / "none.h5")
    (tmp_path / "notes.h5").write_text("not HDF5")
    with pytest.raises(pipeline.InputError, match="not a readable HDF5 file"):
        pipeline.train(tmp_path / "notes.h5")


def test_train_in_memory_equals_the_command_line_and_saves_the_same_directory(small_cache, tmp_path):
    assert cli_in_process("train", small_cache, "--out", tmp_path / "cli", "-q").returncode == 0
    model = pipeline.train(small_cache)
    assert model.path is None and "not saved" in repr(model)
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    volatile = ("fit_seconds", "predict_seconds")
    assert {k: v for k, v in model.metrics.items() if k not in volatile} == \
        {k: v for k, v in cli.items() if k not in volatile}
    X, y = pipeline.open_cache(small_cache).arrays("test")
    scores = model.predict_features(X)
    assert scores.shape == (12, 3) and np.mean(scores.argmax(1) == y) == cli["top1"]
    model.save(tmp_path / "api")
    assert model.path == tmp_path / "api"
    assert (tmp_path / "api" / "details.json").read_text() == (tmp_path / "cli" / "details.json").read_text()
    with pytest.raises(pipeline.InputError, match="already holds a model directory"):
        pipeline.train(small_cache, out=tmp_path / "api")


class OwnRidge(RidgeClassifier):
    """A class of the user's: skops does not trust it."""


def test_a_scikit_learn_estimator_is_tuned_over_its_grid_and_gives_decision_values(small_cache):
    model = pipeline.train(small_cache, RidgeClassifier(), grid={"alpha": [0.1, 1.0, 10.0]},
                           calibration="none")   # its own scores
    assert model.approach == "RidgeClassifier" and model.score_kind == "decision values"
    assert set(model.details["search"]["scores"]) == {"alpha=0.1", "alpha=1", "alpha=10"}
    assert model.details["hyperparameters"]["alpha"] in (0.1, 1.0, 10.0)
    assert model.metrics["selection"] == "val" and model.metrics["eval_split"] == "test"
    predictions = model.predict(small_cache.parent / "images" / "test" / "red", top_k=2)
    assert len(predictions) == 4 and all(p.labels[0] == "red" and p.score_kind == "decision values"
                                         for p in predictions)
    assert "decision values" in repr(predictions[0])


def test_an_estimator_is_saved_with_skops_and_one_skops_does_not_trust_is_refused(small_cache, tmp_path):
    io = pytest.importorskip("skops.io", reason="scikit-learn estimators other than the zoo's are saved with skops")
    model = pipeline.train(small_cache, RidgeClassifier(), grid={"alpha": [0.1, 1.0, 10.0]})
    X = pipeline.open_cache(small_cache).arrays("test")[0]
    model.save(tmp_path / "ridge")
    saved = pipeline.load_model(tmp_path / "ridge")
    np.testing.assert_allclose(saved.predict_features(X), model.predict_features(X), atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "ridge" / "model.json").read_text())["kind"] == "estimator"
    assert not any(is_pickle(p.read_bytes()) for p in (tmp_path / "ridge").iterdir())
    images = small_cache.parent / "images" / "test" / "red"
    assert [p.labels for p in saved.predict(images)] == [p.labels for p in model.predict(images)]
    with pytest.raises(pipeline.InputError, match=r"an? OwnRidge cannot be saved: it holds types that skops does "
                                                  r"not trust \(tests.test_api.OwnRidge\)"):
        pipeline.train(small_cache, OwnRidge(), tmp_path / "own")
    assert not (tmp_path / "own").exists()
    planted = tmp_path / "planted"
    shutil.copytree(tmp_path / "ridge", planted)
    own = pipeline.train(small_cache, OwnRidge())._trained.model
    io.dump(own, planted / "head.skops")   # a class of the user's, digests updated to match
    info = json.loads((planted / "model.json").read_text())
    info["files"]["head.skops"] = sha256_file(planted / "head.skops")
    (planted / "model.json").write_text(json.dumps(info))
    with pytest.raises(pipeline.InputError, match="names types that skops does not trust"):
        pipeline.load_model(planted).predict_features(np.zeros((1, 1280), np.float32))


def test_predict_lists_skipped_files_with_their_reason(small_cache, tmp_path):
    folder = make_image_folder(tmp_path / "new", {"test": 1}, split_folders=False)
    (folder / "red" / "notes.png").write_text("not an image")
    predictions = pipeline.train(small_cache, "logreg").predict(folder, top_k=1)
    skipped = [p for p in predictions if p.skipped]
    assert len(predictions) == 4 and len(skipped) == 1 and skipped[0].labels == []
    assert skipped[0].path.endswith("notes.png") and "skipped" in repr(skipped[0])
    assert all(isinstance(p.familiar, bool) and p.novelty >= 0 for p in predictions if not p.skipped)


@pytest.mark.parametrize("call, message", [
    (lambda c, out: pipeline.train(c, out=out, C=-1), "C must be above 0, got -1"),
    (lambda c, out: pipeline.train(c, out=out, neighbours=3), "neighbours is not a setting of logreg"),
    (lambda c, out: pipeline.train(c, "forest", out=out), "classifier must be one of"),
    (lambda c, out: pipeline.train(c, "logreg", out, grid={"C": [1]}), "grid= tunes a scikit-learn estimator"),
    (lambda c, out: pipeline.train(c, RidgeClassifier(), out, grid={"beta": [1]}), "has no parameter 'beta'"),
    (lambda c, out: pipeline.train(c, RidgeClassifier(), out, grid={"alpha": []}), "non-empty lists"),
    (lambda c, out: pipeline.train(c, RidgeClassifier(), out, C=1.0), "C is not a setting of pipeline.train"),
    (lambda c, out: pipeline.train(c, LinearSVC(), grid={"C": [-1.0]}), "LinearSVC{'C': -1.0}"),
    (lambda c, out: pipeline.train(c, object(), out), "a scikit-learn classifier"),
    (lambda c, out: pipeline.audit(c, out, folds=1), "folds must be at least 2"),
    (lambda c, out: pipeline.extract(out, out / "f.h5", image_size=0), "image_size must be at least 1"),
    (lambda c, out: pipeline.extract(out, out / "f.h5", colour=True), "colour is not a setting of pipeline.extract"),
    (lambda c, out: pipeline.finetune(out, out / "m", epochs=0), "epochs must be at least 1"),
    (lambda c, out: pipeline.compare([]), "at least one model directory"),
    (lambda c, out: pipeline.compare([pipeline.train(c)]), "cannot be compared before it is saved"),
    (lambda c, out: pipeline.load_model(out), "is not a model directory"),
])
def test_bad_input_raises_input_error_and_writes_nothing(small_cache, tmp_path, call, message):
    out = tmp_path / "out"
    with pytest.raises(pipeline.InputError, match=message.replace("{", r"\{").replace("(", r"\(")):
        call(small_cache, out)
    assert not out.exists()
