"""Multi-label images: a labels file listing several labels per image, its cache's 0/1 label matrix, one-vs-rest
and sigmoid heads with per-class thresholds, predict, fine-tuning with BCE, and the targets on generated mosaics of
the demo's items."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import api
from pipeline.data.demo import write_mosaics
from pipeline.data.folders import DatasetSettings
from pipeline.heads.classifiers import CLASSIFIERS
from pipeline.runtime.errors import InputError
from pipeline.storage.cache import open_cache
from tests.conftest import ROOT, cli_in_process

ARCHIVE = ROOT / "data" / "fashion_mnist_demo.npz"


@pytest.fixture(scope="session")
def mosaics(tmp_path_factory) -> Path:
    """60 mosaics of 4 classes and their labels file."""
    return write_mosaics(ARCHIVE, tmp_path_factory.mktemp("mosaics") / "images", 60, classes=4)


@pytest.fixture(scope="session")
def multilabel_cache(mosaics, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ml-cache") / "features.h5"
    cli_in_process("extract", mosaics.parent, "--labels", mosaics, "--label-column", "tags", "--multi-label",
                   "--out", out, "--image-size", 64, "--workers", 0, "--quiet", check=True)
    return out


def labels_file(tmp_path: Path, mosaics: Path, edit) -> Path:
    """A copy of the mosaics' labels file with `edit(rows)` applied to its [id, tags] rows."""
    rows = [line.split(",", 1) for line in mosaics.read_text().splitlines()[1:]]
    edit(rows)
    path = tmp_path / "labels.csv"
    path.write_text("id,tags\n" + "\n".join(f"{i},{t}" for i, t in rows) + "\n")
    return path


def scan(mosaics: Path, labels: Path):
    return DatasetSettings(labels=str(labels), label_column="tags", multi_label=True).scan(mosaics.parent)


def test_cache_holds_a_label_matrix_per_split(multilabel_cache, mosaics):
    listed = {f"{i}.png": set(t.split("|")) for i, t in (line.split(",", 1)
              for line in mosaics.read_text().splitlines()[1:])}
    with open_cache(multilabel_cache) as cache:
        assert cache.multi_label and cache.attrs["schema_version"] == 5
        assert cache.splits == ["train", "val", "test"]
        for split in cache.splits:
            part = cache.read(split)
            assert part.labels.shape == (len(part.paths), 4) and part.labels.dtype == np.uint8
            assert np.array_equal(cache.label_matrix(split), part.labels)
            for path, row in zip(part.paths, part.labels):
                assert {c for c, on in zip(cache.classes, row) if on} == listed[path]
    manifest = multilabel_cache.with_suffix(".manifest.csv").read_text().splitlines()
    path, tags, _ = manifest[1].split(",")
    assert set(tags.split("|")) == listed[path]


def test_relabelling_keeps_the_fingerprint_and_reuses_every_vector(multilabel_cache, mosaics, tmp_path):
    out = tmp_path / "features.h5"
    out.write_bytes(multilabel_cache.read_bytes())
    relabelled = labels_file(tmp_path, mosaics, lambda rows: rows[0].__setitem__(1, ""))   # now a negative
    done = cli_in_process("extract", mosaics.parent, "--labels", relabelled, "--label-column", "tags",
                          "--multi-label", "--out", out, "--image-size", 64, "--workers", 0, check=True)
    assert "0 computed, 60 reused" in done.stdout + done.stderr
    with open_cache(multilabel_cache) as before, open_cache(out) as after:
        assert before.attrs["fingerprint"] == after.attrs["fingerprint"]
        first = next(s for s in after.splits if f"{rows_first(mosaics)}.png" in after.read(s).paths)
        part = after.read(first)
        assert not part.labels[part.paths.index(f"{rows_first(mosaics)}.png")].any()


def rows_first(mosaics: Path) -> str:
    return mosaics.read_text().splitlines()[1].split(",")[0]


def test_a_label_matrix_without_a_column_per_class_is_refused(multilabel_cache, tmp_path):
    damaged = tmp_path / "features.h5"
    damaged.write_bytes(multilabel_cache.read_bytes())
    with h5py.File(damaged, "r+") as f:
        rows = len(f["train/labels"])
        del f["train/labels"]
        f["train"].create_dataset("labels", data=np.zeros((rows, 3), np.uint8), fletcher32=True)
    with pytest.raises(InputError, match="train/labels must be a 0/1 matrix with one column per class"):
        open_cache(damaged)


def test_whitespace_repeats_and_singletons_are_warned_about(mosaics, tmp_path, capsys):
    def edit(rows):
        rows[0][1] = " " + rows[0][1].replace("|", " | ")
        rows[1][1] = rows[1][1] + "|" + rows[1][1].split("|")[0]
        rows[2][1] = rows[2][1] + "|rare-one"
    dataset = scan(mosaics, labels_file(tmp_path, mosaics, edit))
    err = capsys.readouterr().err
    assert "whitespace or empty labels around a separator, stripped: line 2" in err
    assert "a label repeated within the cell, kept once: line 3" in err
    assert "label 'rare-one' has a single image" in err
    assert dataset.multi_label and "rare-one" in dataset.classes
    assert all(isinstance(s.label, tuple) for s in dataset.samples)


def test_an_empty_cell_is_a_negative_for_every_class(mosaics, tmp_path):
    dataset = scan(mosaics, labels_file(tmp_path, mosaics, lambda rows: rows[3].__setitem__(1, "")))
    assert next(s for s in dataset.samples if s.path == f"{rows_first_n(mosaics, 3)}.png").label == ()


def rows_first_n(mosaics: Path, n: int) -> str:
    return mosaics.read_text().splitlines()[1 + n].split(",")[0]


@pytest.mark.parametrize("args, message", [
    (("--multi-label",), "--multi-label needs a labels file"),
    (("--multi-label", "--labels", "{labels}", "--label-column", "tags", "--pool"), "--pool does not combine"),
    (("--multi-label", "--labels", "{only_test}", "--label-column", "tags", "--val-fraction", 0.4, "--test-fraction",
      0.4), "label 'rare' appears only in test and val, never in train"),
    (("--multi-label", "--labels", "{contradicting}", "--label-column", "tags"), "two label sets"),
    (("--multi-label", "--labels", "{labels}", "--label-column", "tags", "--label-separator", " "),
     "--label-separator must be a visible character"),
])
def test_bad_multi_label_input_is_one_error_line_and_writes_nothing(mosaics, tmp_path, args, message):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    only_test = labels_file(tmp_path / "a", mosaics, _tag_two_images)
    contradicting = labels_file(tmp_path / "b", mosaics, lambda rows: rows.append([rows[0][0], "bag"]))
    filled = [str(a).format(labels=mosaics, only_test=only_test, contradicting=contradicting) for a in args]
    out = tmp_path / "features.h5"
    done = cli_in_process("extract", mosaics.parent, *filled, "--out", out)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stderr.strip().startswith("error:")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists() and not out.with_suffix(".manifest.csv").exists()


def _tag_two_images(rows: list) -> None:
    """A label on two images: with val and test fractions of 0.4 each, its group of two gives one to val, one
    to test and none to train."""
    for row in rows[:2]:
        row[1] += "|rare"


@pytest.mark.parametrize("classifier", [c for c, spec in CLASSIFIERS.items() if spec.multi_label])
def test_every_multi_label_head_trains_saves_and_predicts(multilabel_cache, mosaics, tmp_path, classifier):
    model = api.train(multilabel_cache, classifier, tmp_path / "model")
    for key in ("macro_ap", "micro_ap", "macro_f1", "micro_f1", "subset_accuracy", "hamming_loss", "val_score"):
        assert 0 <= model.metrics[key] <= 1, key
    assert model.metrics["eval_split"] == "test" and model.multi_label
    details = json.loads((tmp_path / "model" / "details.json").read_text())
    assert set(details["per_class"]["bag" if "bag" in model.classes else model.classes[0]]) >= {
        "ap", "f1", "threshold", "support"}
    assert set(json.loads((tmp_path / "model" / "scores.json").read_text())) >= {"macro_ap", "macro_f1"}
    loaded = api.load_model(tmp_path / "model")
    assert loaded.thresholds == model.thresholds and set(loaded.thresholds) == set(model.classes)
    with open_cache(multilabel_cache) as cache:
        test = cache.read("test")
    scores = loaded.predict_features(test.features)
    assert scores.shape == test.labels.shape
    predicted = loaded.predict([mosaics.parent / f"{test.paths[0]}"])[0]
    threshold = np.array([loaded.thresholds[c] for c in loaded.classes])
    assert set(predicted.tags) == {c for c, s, t in zip(loaded.classes, scores[0], threshold) if s >= t}


def test_rbf_svm_is_refused_in_one_line(multilabel_cache, tmp_path):
    done = cli_in_process("train", multilabel_cache, "--classifier", "rbf_svm", "--out", tmp_path / "m")
    assert done.returncode == 2 and "rbf_svm does not train on a multi-label cache" in done.stderr
    assert not (tmp_path / "m").exists()


def test_predict_names_the_labels_reaching_their_thresholds(multilabel_cache, mosaics, tmp_path):
    cli_in_process("train", multilabel_cache, "--out", tmp_path / "m", "--quiet", check=True)
    image = mosaics.parent / "00000.png"
    rows = json.loads(cli_in_process("predict", tmp_path / "m", image, "--format", "json", check=True).stdout)
    assert set(rows[0]) >= {"labels", "label_scores", "top"} and len(rows[0]["top"]) == 4
    table = cli_in_process("predict", tmp_path / "m", image, check=True).stdout
    assert f"labels: {', '.join(rows[0]['labels']) or 'none'}" in table
    csv_rows = cli_in_process("predict", tmp_path / "m", image, "--format", "csv", "--top-k", "1",
                              check=True).stdout.splitlines()
    assert csv_rows[0].split(",")[4] == "labelled"
    assert {r.split(",")[2] for r in csv_rows[1:] if r.split(",")[4] == "true"} == set(rows[0]["labels"])


@pytest.mark.slow
def test_targets_on_generated_mosaics(tmp_path_factory):
    """The multi-label head on 2x2 mosaics of the demo's items (benchmarks/multilabel.py, smaller)."""
    from benchmarks.multilabel import measure, mosaic_cache
    work = tmp_path_factory.mktemp("mosaic-targets")
    figures = measure(mosaic_cache(work, 900, 160), work)
    assert figures["macro_ap"] >= 0.80, figures
    assert figures["macro_f1_tuned"] >= figures["macro_f1_single_label"] + 0.15, figures


@pytest.mark.parametrize("classifier, calibration, method", [
    ("logreg", "auto", "platt per class"), ("torch_logreg", "auto", "platt per class"),
    ("torch_linear", "auto", "platt per class"), ("linear_svm", "platt", "platt per class"),
    ("logreg", "temperature", "temperature per class")])
def test_export_gives_the_scores_predict_gives_with_the_thresholds(multilabel_cache, mosaics, tmp_path, classifier,
                                                                   calibration, method):
    import onnxruntime
    import torch
    from PIL import Image

    from pipeline.models.directory import open_model
    model = api.train(multilabel_cache, classifier, tmp_path / "m", calibration=calibration)
    cli_in_process("export", tmp_path / "m", "--out", tmp_path / "m.onnx", check=True)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    meta = json.loads(session.get_modelmeta().custom_metadata_map["model.json"])
    assert meta["multi_label"] and meta["thresholds"] == model.thresholds
    assert model.info["calibration"]["method"] == method
    directory = open_model(tmp_path / "m")
    image = directory.preprocessing.transform()(Image.open(mosaics.parent / "00000.png").convert("RGB"))[None].numpy()
    exported = session.run(None, {session.get_inputs()[0].name: image})[0]
    expected = directory.scorer(torch.device("cpu"), "torch")(torch.from_numpy(image))
    assert np.allclose(exported, expected, atol=2e-3)


FINETUNE = {"label_column": "tags", "multi_label": True, "strategy": "head", "epochs": 2, "image_size": 64,
            "batch_size": 12, "workers": 0, "device": "cpu"}


def finetune_settings(mosaics: Path):
    from pipeline.tuning.training import FinetuneSettings
    return FinetuneSettings(labels=str(mosaics), **FINETUNE)


@pytest.fixture(scope="session")
def finetuned_tags(mosaics, tmp_path_factory) -> Path:
    """A network fine-tuned on the mosaics' labels file through the Python API (head only, two epochs at 64 px,
    with its checkpoint)."""
    out = tmp_path_factory.mktemp("ml-finetuned") / "ft"
    model = api.finetune(mosaics.parent, out, labels=mosaics, quiet=True, checkpoint=True, **FINETUNE)   # a Path will do
    assert model.multi_label and "macro AP" in repr(model)
    return out


def scores_of_split(model_dir: Path, mosaics: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The scores `predict` gives the images of `split` and their 0/1 labels, columns in class order."""
    from pipeline.models.predict import predict
    dataset = scan(mosaics, mosaics)
    samples = dataset.split(split)
    results = predict(model_dir, [mosaics.parent / x.path for x in samples], top_k=len(dataset.classes), device="cpu")
    scores = np.array([[{t["class"]: t["score"] for t in r["top"]}[c] for c in dataset.classes] for r in results])
    Y = np.zeros(scores.shape, np.uint8)
    for row, x in zip(Y, samples):
        row[list(x.label)] = 1
    return scores, Y


def network_logits(model_dir: Path, mosaics: Path, split: str) -> np.ndarray:
    """The fine-tuned network's logits of the images of `split`, in the order of `scores_of_split`."""
    import torch

    from pipeline.data.images import read_image
    from pipeline.models.directory import open_model
    model = open_model(model_dir)
    pre = model.preprocessing
    images = [pre.transform()(read_image(mosaics.parent / x.path, pre.resize)[0])
              for x in scan(mosaics, mosaics).split(split)]
    with torch.inference_mode():
        return model._classifier(torch.stack(images)).double().numpy()


def test_finetune_trains_sigmoids_with_bce_and_tunes_thresholds_on_val(finetuned_tags, mosaics):
    """The kept epoch is the one of the best val macro AP, and its val loss the BCE of the network's logits; the
    scores predict gives are their sigmoids calibrated per class, and the thresholds and calibration those the
    heads fit, on val's scores; the metrics are those of the test scores at them."""
    import torch
    from scipy.special import expit

    from pipeline.heads.metrics import evaluate_multilabel
    from pipeline.heads.multilabel import decision_rule
    m = json.loads((finetuned_tags / "metrics.json").read_text())
    history = [{k: float(v) for k, v in row.items() if k != "phase"}
               for row in csv.DictReader(open(finetuned_tags / "history.csv"))]
    ap = [h["val_macro_ap"] for h in history]
    assert m["best_epoch"] == ap.index(max(ap)) + 1 and m["val_score"] == pytest.approx(max(ap))
    assert m["eval_split"] == "test" and 0 <= m["ece"] <= 1
    model = api.load_model(finetuned_tags)
    assert model.multi_label and set(model.thresholds) == set(model.classes)
    val_scores, val_Y = scores_of_split(finetuned_tags, mosaics, "val")
    logits = network_logits(finetuned_tags, mosaics, "val")
    platt, expected, _ = decision_rule(finetune_settings(mosaics), "finetune", expit(logits), val_Y, True)
    assert model.info["calibration"]["method"] == "platt per class"   # auto, for multi-label data
    # refitted on the float32 logits read back: the slopes and offsets agree to the solver's tolerance
    assert np.allclose(model.info["calibration"]["slopes"], platt.slopes, rtol=1e-2)
    assert np.allclose(model.info["calibration"]["offsets"], platt.offsets, rtol=1e-2)
    assert np.allclose(val_scores, platt.apply(expit(logits)), atol=1e-4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.tensor(val_Y / 1.0),
                                                               reduction="none").sum(1).mean()   # over the classes
    assert float(bce) == pytest.approx(history[m["best_epoch"] - 1]["val_loss"], rel=1e-4)
    assert [model.thresholds[c] for c in model.classes] == pytest.approx(expected, abs=1e-5)
    test_scores, test_Y = scores_of_split(finetuned_tags, mosaics, "test")
    again = evaluate_multilabel(test_Y, test_scores, np.array(expected), model.classes)
    for key in ("macro_ap", "micro_ap", "macro_f1", "subset_accuracy", "hamming_loss"):
        assert m[key] == pytest.approx(again[key], abs=1e-4), key
    details = json.loads((finetuned_tags / "details.json").read_text())
    assert details["per_class"][model.classes[0]]["threshold"] == pytest.approx(expected[0], abs=1e-5)
    assert json.loads((finetuned_tags / "confusion.json").read_text()) == []
    assert all((finetuned_tags / f).stat().st_size > 0 for f in ("confusion.png", "reliability.png", "held_out.npz"))


def test_predict_names_the_labels_of_a_fine_tuned_network(finetuned_tags, mosaics):
    image = mosaics.parent / "00000.png"
    rows = json.loads(cli_in_process("predict", finetuned_tags, image, "--format", "json", "--top-k", 4,
                                     check=True).stdout)
    scores = {t["class"]: t["score"] for t in rows[0]["top"]}
    thresholds = api.load_model(finetuned_tags).thresholds
    assert rows[0]["labels"] == sorted((c for c in scores if scores[c] >= thresholds[c]), key=lambda c: -scores[c])
    assert sum(scores.values()) != pytest.approx(1)   # one sigmoid per class, not a softmax
    tags = api.load_model(finetuned_tags).predict(image, device="cpu")[0].tags
    assert list(tags) == rows[0]["labels"]


def test_a_fine_tuned_multi_label_network_exports_its_sigmoids_and_thresholds(finetuned_tags, mosaics, tmp_path):
    import onnxruntime
    import torch
    from PIL import Image

    from pipeline.models.directory import open_model
    cli_in_process("export", finetuned_tags, "--out", tmp_path / "ft.onnx", check=True)
    session = onnxruntime.InferenceSession(str(tmp_path / "ft.onnx"))
    meta = json.loads(session.get_modelmeta().custom_metadata_map["model.json"])
    assert meta["multi_label"] and meta["thresholds"] == api.load_model(finetuned_tags).thresholds
    directory = open_model(finetuned_tags)
    image = directory.preprocessing.transform()(Image.open(mosaics.parent / "00000.png").convert("RGB"))[None]
    exported = session.run(None, {session.get_inputs()[0].name: image.numpy()})[0]
    with torch.inference_mode():
        assert np.allclose(exported, directory.scorer(torch.device("cpu"))(image), atol=1e-4)


def test_gradcam_of_a_chosen_class(finetuned_tags, mosaics, tmp_path):
    import torch

    from pipeline.models.directory import open_model
    from pipeline.models.visualize import gradcam_maps
    cli_in_process("visualize", finetuned_tags, mosaics.parent, "--limit", 3, "--gradcam-class", "dress",
                   "--out", tmp_path / "v", "--device", "cpu", check=True)
    assert (tmp_path / "v" / "gradcam.png").stat().st_size > 0
    network = open_model(finetuned_tags).network()
    images = torch.randn(2, 3, 64, 64)
    maps, mapped = gradcam_maps(network.module, network.feature_layer, images, target=2)
    assert mapped.tolist() == [2, 2] and maps.shape == (2, 64, 64)
    unknown = cli_in_process("visualize", finetuned_tags, mosaics.parent, "--gradcam-class", "hat",
                             "--out", tmp_path / "w")
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines() == [
        f"error: --gradcam-class hat is not a class of {finetuned_tags}: {', '.join(open_model(finetuned_tags).classes)}"]
    assert not (tmp_path / "w").exists()


def test_the_scratch_baseline_from_the_command_line(mosaics, tmp_path):
    """Random weights, all layers, one epoch, no calibration: the summary line gives macro AP and F1, and compare
    ranks the model by its val macro AP."""
    from pipeline.report.compare import rows
    out = tmp_path / "scratch"
    done = cli_in_process("finetune", mosaics.parent, "--labels", mosaics, "--label-column", "tags", "--multi-label",
                          "--strategy", "scratch", "--epochs", 1, "--image-size", 32, "--batch-size", 20,
                          "--calibration", "none", "--workers", 0, "--device", "cpu", "--out", out, check=True)
    m = json.loads((out / "metrics.json").read_text())
    assert f"scratch: macro AP {m['macro_ap']:.3f}, macro F1 {m['macro_f1']:.3f} on test " in done.stderr
    assert "val loss" in done.stdout and "macro AP" in done.stdout   # the epoch's line
    model = api.load_model(out)
    assert model.info["backbone"]["weights"] == "none" and "calibration" not in model.info
    assert m["ece"] == m["ece_uncalibrated"]
    row = rows([out])[0]
    assert row["multi_label"] and row["val_score"] == m["val_score"]
    assert row["val_interval"][0] <= m["val_score"] <= row["val_interval"][1]


def test_finetune_refuses_a_label_found_only_in_val_and_test_in_one_line(mosaics, tmp_path):
    only_test = labels_file(tmp_path, mosaics, _tag_two_images)
    done = cli_in_process("finetune", mosaics.parent, "--labels", only_test, "--label-column", "tags",
                          "--multi-label", "--val-fraction", 0.4, "--test-fraction", 0.4, "--out", tmp_path / "m")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: label 'rare' appears only in test and val, never in train; give it more images or fix the labels file"]
    assert not (tmp_path / "m").exists()


def test_a_multi_label_finetune_resumed_after_an_interruption_repeats_the_whole_run(finetuned_tags, mosaics,
                                                                                      tmp_path, monkeypatch):
    """Stopped after its first epoch's checkpoint, then resumed: the same epochs and weights as the run never
    stopped (random crops and flips on)."""
    import torch

    from pipeline.runtime.errors import Interrupted
    from pipeline.storage import modeldir
    from pipeline.tuning import training
    written = training.save_checkpoint

    def save_then_stop(path, state):
        written(path, state)
        raise KeyboardInterrupt

    part = tmp_path / "part"
    monkeypatch.setattr(training, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted, match="holds the last finished epoch"):
        training.finetune(mosaics.parent, part, finetune_settings(mosaics), quiet=True, checkpoint=True)
    monkeypatch.setattr(training, "save_checkpoint", written)
    training.finetune(mosaics.parent, part, finetune_settings(mosaics), quiet=True,
                      resume=part / training.CHECKPOINT)
    histories = [list(csv.DictReader(open(d / "history.csv"))) for d in (finetuned_tags, part)]
    assert [[(r["epoch"], r["train_loss"], r["val_macro_ap"]) for r in h] for h in histories][0] == \
        [[(r["epoch"], r["train_loss"], r["val_macro_ap"]) for r in h] for h in histories][1]
    whole, resumed = modeldir.load(finetuned_tags)[1], modeldir.load(part)[1]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert modeldir.read_info(part)["thresholds"] == modeldir.read_info(finetuned_tags)["thresholds"]


def test_scores_are_calibrated_per_class_and_the_thresholds_apply_to_them(multilabel_cache, tmp_path):
    from pipeline.heads.calibration import ClassPlatt
    from pipeline.heads.metrics import evaluate_multilabel
    from pipeline.heads.multilabel import scores_of
    calibrated = api.train(multilabel_cache, "linear_svm", tmp_path / "calibrated")   # auto: Platt per class
    own = api.train(multilabel_cache, "linear_svm", tmp_path / "own", calibration="none")
    info = json.loads((tmp_path / "calibrated" / "model.json").read_text())
    assert info["calibration"]["method"] == "platt per class" and "calibration" not in own.info
    assert 0 <= calibrated.metrics["ece"] <= 1
    assert own.metrics["ece_uncalibrated"] == calibrated.metrics["ece_uncalibrated"]
    assert own.metrics["ece"] == own.metrics["ece_uncalibrated"]
    with open_cache(multilabel_cache) as cache:
        test = cache.read("test")
    raw = scores_of(api.load_model(tmp_path / "own")._directory.model, test.features)   # decision values
    scores = api.load_model(tmp_path / "calibrated").predict_features(test.features)
    platt = ClassPlatt.from_dict(info["calibration"])
    assert np.allclose(scores, platt.apply(raw)) and min(platt.slopes) > 0
    assert ((scores > 0) & (scores < 1)).all() and (np.argsort(scores, 0) == np.argsort(raw, 0)).all()
    assert calibrated.metrics["macro_ap"] == pytest.approx(own.metrics["macro_ap"])   # a rising map keeps the order
    names = list(calibrated.thresholds)
    thresholds = np.array([calibrated.thresholds[c] for c in names])
    assert calibrated.metrics["macro_f1"] == pytest.approx(
        evaluate_multilabel(test.labels, scores, thresholds, names)["macro_f1"])   # the cut is on calibrated scores
    # on calibrated scores, each threshold is half the best F1 of its class: at most 0.5; the head's own
    # decision values are cut where F1 peaks
    assert all(0 < t <= 0.5 for t in calibrated.thresholds.values())
    assert any(t < 0 for t in own.thresholds.values())


def test_weighted_macro_ap_is_sklearns_average_precision_with_weights():
    from sklearn.metrics import average_precision_score

    from pipeline.heads.metrics import macro_ap, weighted_macro_ap
    rng = np.random.default_rng(0)
    Y = (rng.random((50, 3)) < 0.3).astype(np.uint8)
    Y[0, 2] = 1
    scores = np.round(Y * 0.4 + rng.random(Y.shape), 1)   # rounded: tied scores
    weights = rng.multinomial(50, np.full(50, 1 / 50), size=4)
    expected = [np.mean([average_precision_score(Y[:, c], scores[:, c], sample_weight=w) for c in range(3)
                         if (w * Y[:, c]).any()]) for w in weights]
    assert np.allclose(weighted_macro_ap(Y, scores, weights), expected)
    assert np.isclose(weighted_macro_ap(Y, scores, np.ones((1, 50)))[0], macro_ap(Y, scores))


def test_compare_ranks_multi_label_models_by_val_macro_ap_with_bootstrap_intervals(multilabel_cache, tmp_path):
    from pipeline.heads.metrics import macro_ap
    for classifier in ("logreg", "knn"):
        api.train(multilabel_cache, classifier, tmp_path / "models" / classifier)
    with np.load(tmp_path / "models" / "logreg" / "held_out.npz") as held:
        with open_cache(multilabel_cache) as cache:
            assert np.array_equal(held["labels"], cache.read("val").labels)
        assert np.isclose(macro_ap(held["labels"], held["scores"]),
                          json.loads((tmp_path / "models" / "logreg" / "metrics.json").read_text())["val_score"])
    cli_in_process("compare", tmp_path / "models", "--out", tmp_path / "reports", check=True)
    table = json.loads((tmp_path / "reports" / "compare.json").read_text())
    assert [r["val_score"] for r in table] == sorted((r["val_score"] for r in table), reverse=True)
    assert table[0]["selected"] and not table[1]["selected"]
    for row in table:
        metrics = json.loads((tmp_path / "models" / row["name"] / "metrics.json").read_text())
        assert row["multi_label"] and row["val_score"] == metrics["val_score"]
        assert row["n_val_scored"] == metrics["n_val"] and row["macro_f1"] == metrics["macro_f1"]
        low, high = row["val_interval"]
        assert 0 <= low <= high <= 1 and low < high
    report = (tmp_path / "reports" / "compare.md").read_text()
    assert "selection score: macro AP (95% CI)" in report and "Hamming loss" in report
    assert "percentile-bootstrap intervals" in report and (tmp_path / "reports" / "compare.png").stat().st_size


def test_platt_calibration_of_a_single_label_head_is_refused_in_one_line(small_cache, tmp_path):
    done = cli_in_process("train", small_cache, "--calibration", "platt", "--out", tmp_path / "m")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("error: calibration 'platt' is per class, for a multi-label cache")
    assert not (tmp_path / "m").exists()


def test_compare_refuses_to_mix_single_and_multi_label_models(multilabel_cache, small_cache, tmp_path):
    api.train(multilabel_cache, "ridge", tmp_path / "multi")
    api.train(small_cache, "ridge", tmp_path / "single")
    done = cli_in_process("compare", tmp_path / "single", tmp_path / "multi", "--out", tmp_path / "reports")
    assert done.returncode == 2 and "one is a multi-label model, the other single-label" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "reports").exists()
    (tmp_path / "multi" / "held_out.npz").unlink()
    done = cli_in_process("compare", tmp_path / "multi", "--out", tmp_path / "reports")
    assert done.returncode == 2 and "lacks held_out.npz" in done.stderr


def test_the_documented_dvc_params_run_train_and_compare(mosaics, tmp_path):
    """docs/multilabel.md's params.yaml keys over the demo's, through the stage scripts of dvc.yaml (in this
    process; tests/test_dvc_pipeline.py runs the real `dvc repro` of the demo): each train stage writes every
    output dvc.yaml declares, and compare ranks the models by val macro AP."""
    import re

    import yaml

    from tests.conftest import stage_in_process
    documented = re.search(r"```yaml\n(.*?)```", (ROOT / "docs" / "multilabel.md").read_text(), re.S).group(1)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in yaml.safe_load(documented).items():
        params[key] = {**params[key], **value} if key == "extract" else value
    assert params["extract"]["multi_label"] and set(params["extractors"]) == {"lite0_160"}
    data = tmp_path / params["data"]
    data.symlink_to(mosaics.parent)   # the mosaics, with their labels file, where the params expect them
    params["extract"].update(workers=0)
    params["extractors"]["lite0_160"]["image_size"] = 32
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stage_in_process("extract.py", tmp_path, "lite0_160", params["data"], "features/lite0_160.h5", check=True)
    train_outs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["outs"]
    for classifier in params["train"]:
        out = f"models/lite0_160/{classifier}"
        stage_in_process("train.py", tmp_path, classifier, "features/lite0_160.h5", out, check=True)
        for declared in train_outs:
            path = next(iter(declared)) if isinstance(declared, dict) else declared
            assert (tmp_path / path.replace("${item.extractor}/${item.classifier}", out[7:])).is_file()
    done = stage_in_process("compare.py", tmp_path, "reports", "models", check=True)
    rows = json.loads((tmp_path / "reports" / "compare.json").read_text())
    assert {r["name"] for r in rows} == {f"lite0_160/{c}" for c in params["train"]}
    assert all(r["multi_label"] for r in rows)
    assert f"selected {rows[0]['name']}: {rows[0]['val_score']:.3f}" in done.stdout


def test_thresholds_are_half_the_best_f1_or_where_f1_peaks():
    from sklearn.metrics import f1_score

    from pipeline.heads.metrics import half_best_f1_thresholds, tuned_thresholds
    Y = np.array([[1, 0], [1, 0], [0, 0], [0, 0], [1, 0]])
    scores = np.array([[0.9, 0.1], [0.6, 0.2], [0.7, 0.3], [0.2, 0.4], [0.4, 0.5]])
    peaks, untuned = tuned_thresholds(Y, scores, 0.5)
    assert peaks[0] == 0.4 and f1_score(Y[:, 0], scores[:, 0] >= 0.4) == pytest.approx(6 / 7)   # 3 of 4 labelled
    assert untuned == [1] and peaks[1] == 0.5
    halves, untuned = half_best_f1_thresholds(Y, scores)
    assert halves[0] == pytest.approx(3 / 7) and halves[1] == 0.5 and untuned == [1]
