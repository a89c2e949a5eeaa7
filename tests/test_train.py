"""Stage two's protocol and metrics: the evaluation split never influences a choice, the metrics
agree with independent computations, and DVC can show the metrics and confusion plots."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import classification_report, confusion_matrix, log_loss, top_k_accuracy_score

from pipeline.heads.classifiers import CLASSIFIERS
from pipeline.heads.metrics import evaluate
from pipeline.heads.settings import train_settings
from pipeline.heads.train import scores_of, train
from pipeline.models.directory import open_model
from tests.conftest import ROOT, synthetic_cache

CLASSES = ["a", "b", "c", "d"]
DESIGN_KEYS = ("top1", "balanced_accuracy", "macro_f1", "eval_split", "n_train", "n_eval", "fit_seconds")
QUICK = {"torch_linear": {"epochs": 8, "patience": 2}, "torch_mlp": {"epochs": 8, "patience": 2, "hidden": 16}}


def blobs(n_per_class: int, seed: int, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes, so that hyperparameters matter."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(0, 1.0, (len(CLASSES), dim))
    y = np.repeat(np.arange(len(CLASSES)), n_per_class)
    return (centres[y] + rng.normal(0, 1.2, (len(y), dim))).astype(np.float32), y


def fit(cache: Path, out: Path, classifier: str, **settings) -> tuple[dict, object]:
    metrics = train(cache, out, train_settings(classifier, {**QUICK.get(classifier, {}), **settings}))
    return metrics, open_model(out).model


@pytest.mark.parametrize("classifier", ["logreg", "linear_svm", "rbf_svm", "knn", "torch_mlp"])
def test_test_split_never_influences_a_choice(tmp_path, classifier):
    train_, val, test = blobs(15, 1), blobs(8, 2), blobs(8, 3)
    rng = np.random.default_rng(4)
    altered_test = (rng.normal(0, 3, test[0].shape).astype(np.float32), rng.permutation(test[1]))
    a = synthetic_cache(tmp_path / "a.h5", {"train": train_, "val": val, "test": test}, CLASSES)
    b = synthetic_cache(tmp_path / "b.h5", {"train": train_, "val": val, "test": altered_test}, CLASSES)
    ma, model_a = fit(a, tmp_path / "a", classifier)
    mb, model_b = fit(b, tmp_path / "b", classifier)

    scored = ("top1", "balanced_accuracy", "macro_f1")
    assert [ma[k] for k in scored] != [mb[k] for k in scored]      # the evaluation did see other data
    assert ma["hyperparameters"] == mb["hyperparameters"] and ma["search"] == mb["search"]
    probe = np.random.default_rng(5).normal(0, 2, (50, 8)).astype(np.float32)
    np.testing.assert_array_equal(scores_of(model_a, probe, 4), scores_of(model_b, probe, 4))

    assert (ma["eval_split"], ma["selection"]) == ("test", "val")
    assert (ma["n_train"], ma["n_val"], ma["n_test"], ma["n_eval"]) == (60, 32, 32, 32)
    tuned = CLASSIFIERS[classifier].tuned
    scores = ma["search"]["scores"]
    assert scores[f"{ma['hyperparameters'][tuned]:g}"] == max(scores.values()) == ma["val_score"]   # won on val
    if classifier == "knn":                                            # the winner is refitted on train+val
        assert model_a[-1].n_samples_fit_ == 60 + 32


def test_rbf_svm_scores_each_c_by_the_svm_alone_and_calibrates_the_chosen_one(tmp_path, monkeypatch):
    """Calibration (five more fits) is made once, for the chosen C: the search's scores are the val accuracies
    of the uncalibrated SVM, one fit per value, and the model written gives calibrated probabilities."""
    from sklearn.preprocessing import normalize
    from sklearn.svm import SVC
    fits, real_fit = [], SVC.fit
    monkeypatch.setattr(SVC, "fit", lambda self, *a, **kw: fits.append(self.C) or real_fit(self, *a, **kw))
    train_, val, test = blobs(15, 1), blobs(8, 2), blobs(8, 3)
    cache = synthetic_cache(tmp_path / "c.h5", {"train": train_, "val": val, "test": test}, CLASSES)
    metrics, model = fit(cache, tmp_path / "m", "rbf_svm")
    assert len(fits) == len(metrics["search"]["scores"]) + 6 + 6  # the final model: 5 calibration folds and all;
    # the same on train alone, whose val scores fit the temperature
    for c, score in metrics["search"]["scores"].items():
        svm = SVC(C=float(c), random_state=0).fit(normalize(train_[0]), train_[1])
        assert score == pytest.approx(np.mean(svm.predict(normalize(val[0])) == val[1]))
    probabilities = model[-1].predict_proba(model[0].transform(test[0]))
    np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-6)
    assert type(model[-1].model_).__name__ == "CalibratedClassifierCV"


def test_selection_sees_val(tmp_path):
    """The check above would notice influence: altering val (the selection split) changes the search."""
    train_, val, test = blobs(15, 1), blobs(8, 2), blobs(8, 3)
    shuffled_val = (val[0], np.random.default_rng(4).permutation(val[1]))
    a = synthetic_cache(tmp_path / "a.h5", {"train": train_, "val": val, "test": test}, CLASSES)
    b = synthetic_cache(tmp_path / "b.h5", {"train": train_, "val": shuffled_val, "test": test}, CLASSES)
    assert fit(a, tmp_path / "a", "logreg")[0]["search"] != fit(b, tmp_path / "b", "logreg")[0]["search"]


@pytest.mark.parametrize("classifier", ["logreg", "torch_linear"])
def test_without_test_split_selection_is_cv_on_train_and_val_is_evaluated_once(tmp_path, classifier):
    train_, val = blobs(15, 1), blobs(8, 2)
    rng = np.random.default_rng(4)
    altered_val = (rng.normal(0, 3, val[0].shape).astype(np.float32), rng.permutation(val[1]))
    a = synthetic_cache(tmp_path / "a.h5", {"train": train_, "val": val}, CLASSES)
    b = synthetic_cache(tmp_path / "b.h5", {"train": train_, "val": altered_val}, CLASSES)
    ma, model_a = fit(a, tmp_path / "a", classifier, cv_folds=3)
    mb, model_b = fit(b, tmp_path / "b", classifier, cv_folds=3)
    assert (ma["eval_split"], ma["selection"]) == ("val", "3-fold cv on train")
    assert (ma["n_train"], ma["n_val"], ma["n_test"], ma["n_eval"]) == (60, 32, 0, 32)
    assert ma["top1"] != mb["top1"]
    assert ma["hyperparameters"] == mb["hyperparameters"] and ma["search"] == mb["search"]
    probe = np.random.default_rng(5).normal(0, 2, (50, 8)).astype(np.float32)
    np.testing.assert_array_equal(scores_of(model_a, probe, 4), scores_of(model_b, probe, 4))


@pytest.mark.slow
def test_a_flat_search_says_so_and_stops(tmp_path, capsys):
    """Every weight decay scores the same on val here (classes far apart: each value gets all of val right).
    The search warns, keeps a middle value of its grid (not an edge) and tries no finer grid."""
    def apart(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(len(CLASSES)), n)
        return (5 * np.eye(len(CLASSES), 8)[y] + np.random.default_rng(seed).normal(0, 0.3, (len(y), 8))
                ).astype(np.float32), y
    cache = synthetic_cache(tmp_path / "c.h5", {"train": apart(10, 1), "val": apart(5, 2), "test": apart(5, 3)},
                            CLASSES)
    m = train(cache, tmp_path / "m", train_settings("torch_linear", {"epochs": 60, "patience": 5}))
    grid = CLASSIFIERS["torch_linear"].grid
    assert list(m["search"]["scores"]) == [f"{v:g}" for v in grid]
    assert len(set(m["search"]["scores"].values())) == 1
    assert m["hyperparameters"]["weight_decay"] in grid[2:4]
    warning = f"every weight_decay tried scored {m['val_score']:.3f}: the search is flat"
    assert warning in capsys.readouterr().err
    assert warning in json.loads((tmp_path / "m" / "details.json").read_text())["search"]["warnings"][0]


def test_a_best_value_at_the_edge_of_the_grid_is_stepped_past(tmp_path):
    """Noisy training labels, clean val: more neighbours keep helping past the grid's largest k (25).
    The search steps past it; a value left at the edge of what was tried is never chosen silently."""
    rng = np.random.default_rng(0)

    def noisy(n, noise):
        y = np.repeat(np.arange(3), n)
        X = (np.eye(3)[y] + rng.normal(0, 0.8, (len(y), 3))).astype(np.float32)
        return X, np.where(rng.random(len(y)) < noise, rng.integers(0, 3, len(y)), y)

    splits = {"train": noisy(150, 0.5), "val": noisy(60, 0.0), "test": noisy(20, 0.0)}
    m = train(synthetic_cache(tmp_path / "noisy.h5", splits, CLASSES[:3]), tmp_path / "knn",
              train_settings("knn", {"preprocess": "none"}))
    tried = sorted(float(v) for v in m["search"]["scores"])
    assert max(tried) > max(CLASSIFIERS["knn"].grid)
    chosen = m["hyperparameters"]["n_neighbors"]
    assert chosen > 25 and m["val_score"] == max(m["search"]["scores"].values())
    assert chosen < max(tried) or any(f"n_neighbors={chosen:g} is at the edge" in w for w in m["search"]["warnings"])


def test_metrics_agree_with_independent_computations():
    """7 classes (so top-5 counts), one class never predicted, probabilities from a fixed seed."""
    rng = np.random.default_rng(7)
    classes = [f"k{i}" for i in range(7)]
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 5, 5, 5, 6, 6, 6, 6, 1, 3])
    logits = rng.normal(0, 1, (len(y), 7))
    logits[np.arange(len(y)), y] += rng.uniform(-1, 3, len(y))
    logits[:, 3] -= 10                                         # class k3 is never the top score
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = evaluate(y, p, classes, probabilities=True)

    pred = p.argmax(1)
    assert m["top1"] == pytest.approx(np.mean(pred == y))
    in_top5 = [label in np.argsort(-row)[:5] for row, label in zip(p, y)]
    assert m["top5"] == pytest.approx(np.mean(in_top5)) == pytest.approx(top_k_accuracy_score(y, p, k=5))
    cm = confusion_matrix(y, pred, labels=range(7))
    assert m["balanced_accuracy"] == pytest.approx(np.mean(cm.diagonal() / cm.sum(1)))
    report = classification_report(y, pred, labels=range(7), target_names=classes, output_dict=True,
                                   zero_division=0)
    assert m["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])
    for c in classes:
        assert m["per_class"][c]["precision"] == pytest.approx(report[c]["precision"])
        assert m["per_class"][c]["recall"] == pytest.approx(report[c]["recall"])
        assert m["per_class"][c]["support"] == report[c]["support"]
    assert m["per_class"]["k3"]["precision"] == 0.0
    assert m["log_loss"] == pytest.approx(-np.mean(np.log(p[np.arange(len(y)), y])))
    assert m["log_loss"] == pytest.approx(log_loss(y, p, labels=range(7)))

    few = evaluate(y % 3, p[:, :3], classes[:3], probabilities=False)
    assert "top5" not in few and "log_loss" not in few


@pytest.mark.slow
def test_dvc_shows_metrics_and_confusion_plots(small_cache, tmp_path):
    """The project's train@ stages in a real DVC repo: `dvc metrics show` and `dvc plots show` work."""
    repo = tmp_path / "repo"
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stages["train"]}}))
    (repo / "params.yaml").write_text(yaml.safe_dump({"extractors": {"x": {}}, "train": {"logreg": {"C": "auto"}}}))
    (repo / "features").mkdir()
    shutil.copy(small_cache, repo / "features" / "x.h5")
    env = dict(os.environ, PYTHONPATH=str(repo), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    def dvc(*args):
        proc = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc("init", "-q")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")     # the project's plot templates
    dvc("repro")
    shown = json.loads(dvc("metrics", "show", "--json"))
    metrics = next(iter(shown.values()))["data"]
    written = json.loads((repo / "models" / "x" / "logreg" / "metrics.json").read_text())
    assert metrics["models/x/logreg/scores.json"]["data"] == {k: written[k] for k in
                                                              ("top1", "balanced_accuracy", "macro_f1", "val_score")}
    assert set(written) == {*DESIGN_KEYS, "val_score", "selection", "n_val", "n_test", "predict_seconds",
                            "extract_seconds", "log_loss", "ece", "ece_uncalibrated"}   # one value each; no top5
                                                                                   # with 3 classes
    details = json.loads((repo / "models" / "x" / "logreg" / "details.json").read_text())
    assert details["hyperparameters"]["C"] > 0 and details["per_class"]["red"]["support"] == 4
    assert details["search"]["hyperparameter"] == "C" and "0.01" in details["search"]["scores"]
    table = dvc("metrics", "show")
    assert "models/x/logreg/scores.json" in table and "top1" in table and max(map(len, table.splitlines())) <= 120

    plots = json.loads(dvc("plots", "show", "--json"))
    rows = [r for p in plots["data"]["models/x/logreg/confusion.json"] for r in p["content"]["data"]["values"]]
    assert len(rows) == 12 and {"actual", "predicted"} <= set(rows[0])
    dvc("plots", "show", "-o", "plots")
    assert "confusion" in (repo / "plots" / "index.html").read_text()
