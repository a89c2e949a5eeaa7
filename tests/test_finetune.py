"""Fine-tuning: every strategy for one tiny epoch, best-checkpoint selection, the plateau schedule, the
checkpoint, calibration and familiarity, and the model directory that predict and visualize accept."""
from __future__ import annotations

import csv
import json
import math
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.api import load_model
from pipeline.features.backbones.loading import build_backbone
from pipeline.tuning.training import (CHECKPOINT, FinetuneSettings, PlateauSchedule, finetune, load_checkpoint,
                                      make_optimizer, save_checkpoint, stages)
from pipeline.models.directory import open_model
from pipeline.models.predict import predict
from pipeline.report.compare import rows
from pipeline.runtime.errors import InputError
from pipeline.runtime.settings import from_mapping
from pipeline.storage import modeldir
from tests.conftest import cli_in_process, interrupt_when_written, make_image_folder

TINY = {"image_size": 64, "batch_size": 12, "workers": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ft") / "images", {"train": 4, "val": 3, "test": 2})


def _changed(state: dict, start: dict, prefix: str) -> bool:
    keys = [k for k in start if k.startswith(prefix) and start[k].is_floating_point()]
    assert keys, prefix
    return any(not torch.equal(state[f"backbone.{k}"], start[k]) for k in keys)


@pytest.mark.parametrize("strategy", ["partial", "head", "scratch"])
def test_strategy_trains_what_it_says_and_freezes_the_rest(images, tmp_path, strategy):
    out = tmp_path / strategy
    m = finetune(images, out, FinetuneSettings(strategy=strategy, epochs=1, **TINY), quiet=True)
    info, state = modeldir.load(out)
    assert info["kind"] == "finetuned" and info["strategy"] == strategy
    assert m["eval_split"] == "test" and m["n_eval"] == 6 and m["epochs_run"] == m["best_epoch"] == 1
    assert {"top1", "balanced_accuracy", "macro_f1", "n_train", "fit_seconds"} <= set(m)
    weights = "none" if strategy == "scratch" else "imagenet"
    assert info["backbone"]["weights"] == weights
    start = build_backbone("efficientnet_lite0", weights, image_size=64).model.state_dict()
    names = [name for name, _ in stages(build_backbone("efficientnet_lite0", "none").model, "global_pool")]
    frozen = info["frozen_stages"]
    if strategy == "head":
        assert frozen == names
        assert not any(_changed(state, start, n + ".") for n in names)
    elif strategy == "partial":
        assert frozen == names[:len(names) // 2]
        assert not any(_changed(state, start, n + ".") for n in frozen)
        assert _changed(state, start, names[-1] + ".")
    else:
        assert frozen == [] and _changed(state, start, names[0] + ".")
    results = predict(out, [images / "test"], top_k=1, device="cpu")
    assert len(results) == 6 and all(r["top"][0]["class"] in info["classes"] for r in results)


@pytest.mark.slow
def test_full_strategy_from_the_command_line_then_visualize(images, tmp_path):
    out = tmp_path / "full"
    cli_in_process("finetune", images, "--out", out, "--strategy", "full", "--epochs", 2, "--head-epochs", 1,
            "--image-size", 64, "--batch-size", 12, "--workers", 0, "--rotation", 10, "--color-jitter", 0.2,
            "--optimizer", "adamw", "--lr", 0.001, "--quiet", check=True)
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [r["phase"] for r in rows] == ["head", "full"]
    assert all(float(r["images_per_second"]) > 0 and float(r["epoch_seconds"]) > 0 for r in rows)
    assert (out / "curves.png").stat().st_size > 0 and (out / "confusion.png").stat().st_size > 0
    cli_in_process("visualize", out, images / "test", "--out", tmp_path / "visual", "--gradcam", "--device", "cpu",
            check=True)
    assert (tmp_path / "visual" / "predictions.png").stat().st_size > 0
    assert (tmp_path / "visual" / "gradcam.png").stat().st_size > 0


def test_the_best_epoch_by_val_accuracy_is_the_one_kept(images, tmp_path):
    """A too-high learning rate makes val accuracy move between epochs; whatever it does, the saved
    weights must be those of the first epoch with the highest val accuracy."""
    out = tmp_path / "best"
    m = finetune(images, out, FinetuneSettings(strategy="head", epochs=4, optimizer="adamw", lr=0.5,
                                               random_crop=False, flip=False, **TINY), quiet=True)
    history = list(csv.DictReader(open(out / "history.csv")))
    val = [float(r["val_acc"]) for r in history]
    assert m["best_epoch"] == val.index(max(val)) + 1
    classes = modeldir.read_info(out)["classes"]
    results = predict(out, [images / "val"], top_k=1, device="cpu")
    kept = sum(r["top"][0]["class"] == Path(r["path"]).parent.name for r in results) / len(results)
    assert kept == pytest.approx(max(val)) and len(results) == 3 * len(classes)


def test_early_stopping_ends_training_after_patience_epochs_without_improvement(images, tmp_path):
    """With a learning rate too small to change anything, val accuracy never beats epoch 1, so
    patience 2 must end a 10-epoch run after epoch 3, keeping epoch 1."""
    m = finetune(images, tmp_path / "patient", FinetuneSettings(strategy="head", epochs=10, patience=2, lr=1e-12,
                                                                random_crop=False, flip=False, **TINY), quiet=True)
    history = list(csv.DictReader(open(tmp_path / "patient" / "history.csv")))
    assert len({r["val_acc"] for r in history}) == 1
    assert m["epochs_run"] == len(history) == 3 and m["best_epoch"] == 1


@pytest.mark.slow
def test_a_run_resumed_after_ctrl_c_repeats_the_uninterrupted_run(images, tmp_path):
    """Random crops and flips on, shuffled batches: after Ctrl-C at the first checkpoint and --resume,
    every epoch's losses and the final weights equal those of a run that was never stopped."""
    common = ("finetune", images, "--strategy", "full", "--epochs", 3, "--image-size", 64, "--batch-size", 4,
              "--workers", 0, "--device", "cpu", "--quiet", "--checkpoint")
    cli_in_process(*common, "--out", tmp_path / "whole", check=True)
    part = tmp_path / "part"
    stopped = interrupt_when_written([sys.executable, "-m", "pipeline", *common, "--out", part],
                                     part / CHECKPOINT, signal.SIGINT)
    assert stopped.returncode == 130 and not (part / "model.json").exists(), stopped.stderr
    assert stopped.stderr.splitlines() == [f"interrupted: fine-tuning stopped; {part / CHECKPOINT} holds the "
                                           f"last finished epoch: run the same command with --resume "
                                           f"{part / CHECKPOINT} to carry on"]
    cli_in_process(*common, "--out", part, "--resume", part / CHECKPOINT, check=True)
    histories = [list(csv.DictReader(open(d / "history.csv"))) for d in (tmp_path / "whole", part)]
    losses = [[(r["epoch"], r["train_loss"], r["val_loss"]) for r in h] for h in histories]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    whole, resumed = modeldir.load(tmp_path / "whole")[1], modeldir.load(part)[1]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_plateau_schedule_decays_then_stops():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = PlateauSchedule(optimizer, patience=2, factor=0.1, max_decays=2)
    val = [0.5, 0.6, 0.6, 0.6, 0.7, 0.65, 0.7, 0.7, 0.7, 0.7]
    lrs, stopped_at = [], None
    for epoch, acc in enumerate(val, 1):
        if schedule.step(acc):
            stopped_at = epoch
            break
        lrs.append(optimizer.param_groups[0]["lr"])
    # decays after two epochs without improvement (epochs 4 and 7); the third plateau (epoch 9) stops
    assert lrs == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])
    assert stopped_at == 9 and schedule.decays == 2


def test_bad_settings_are_one_line_errors(images, tmp_path):
    proc = cli_in_process("finetune", images, "--out", tmp_path / "x", "--strategy", "full", "--freeze", 3)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: freeze applies to the partial strategy only, not to full"]
    with pytest.raises(InputError, match="freeze must be between 1 and"):
        finetune(images, tmp_path / "y", FinetuneSettings(strategy="partial", freeze=99, epochs=1, **TINY))
    proc = cli_in_process("finetune", images, "--out", tmp_path / "z", "--calibration", "platt")   # before training
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: calibration 'platt' is per class, for a multi-label cache; a single-label head takes auto, "
        "temperature or none"] and not (tmp_path / "z").exists()


def test_params_section_is_checked_key_by_key():
    assert from_mapping(FinetuneSettings, {"strategy": "full", "epochs": 2, "flip": False}, "finetune.ft").flip is False
    for raw, message in (({"strategy": "ful"}, "finetune.ft.strategy must be one of full, partial"),
                         ({"epoch": 2}, "finetune.ft.epoch is not a setting"),
                         ({"flip": "yes"}, "finetune.ft.flip must be true or false")):
        with pytest.raises(InputError, match=message):
            from_mapping(FinetuneSettings, raw, "finetune.ft")


def test_a_checkpoint_keeps_the_whole_training_state_without_a_pickle(tmp_path):
    """Optimizer state keyed by parameter index, a schedule, -inf and the history survive the state file."""
    net = torch.nn.Module()
    net.head, net.backbone = torch.nn.Linear(4, 3), torch.nn.Linear(4, 4)
    s = FinetuneSettings(optimizer="adamw", **TINY)
    optimizer = make_optimizer(net, s)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 3)
    net.head(net.backbone(torch.randn(5, 4))).sum().backward()
    optimizer.step()
    cosine.step()
    state = {"settings": asdict(s), "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scaler": {},
             "cosine": cosine.state_dict(), "plateau": [-math.inf, 0, 0], "history": [{"epoch": 1, "val_acc": 0.5}],
             "best": 0.5, "best_state": net.state_dict(), "best_epoch": 1, "done": False}
    save_checkpoint(tmp_path / CHECKPOINT, state)
    loaded = load_checkpoint(tmp_path / CHECKPOINT, s)
    again = make_optimizer(net, s)
    again.load_state_dict(loaded["optimizer"])
    for before, after in zip(optimizer.state_dict()["state"].values(), again.state_dict()["state"].values()):
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert loaded["plateau"] == [-math.inf, 0, 0] and loaded["cosine"] == cosine.state_dict()
    assert {k: loaded[k] for k in ("history", "best", "best_epoch", "done")} == \
        {k: state[k] for k in ("history", "best", "best_epoch", "done")}
    assert all(torch.equal(loaded["best_state"][k], v) for k, v in net.state_dict().items())
    assert not (tmp_path / CHECKPOINT).read_bytes().startswith(b"\x80")   # not a pickle


def test_a_fine_tuned_model_is_calibrated_on_val_and_scores_novelty(finetuned):
    m = json.loads((finetuned / "metrics.json").read_text())
    assert 0 <= m["ece"] <= 1 and 0 <= m["ece_uncalibrated"] <= 1
    assert len(json.loads((finetuned / "details.json").read_text())["reliability"]) == 15
    assert (finetuned / "reliability.png").stat().st_size > 0
    model = open_model(finetuned)
    assert model.familiarity.quantile == 0.95 and model.familiarity.reference.shape[0] == 12   # the train images
    labels, logits = modeldir.read_held_out(finetuned, model.info)   # val's labels and logits, the temperature's fit
    assert logits.shape == (len(labels), len(model.classes)) and model.calibration.value > 0
    images = finetuned.parent / "images" / "test"
    results = predict(finetuned, [images], top_k=3, device="cpu")
    batch = torch.stack([model.preprocessing.transform()(Image.open(r["path"]).convert("RGB")) for r in results])
    with torch.inference_mode():
        logits = model._classifier(batch)
    expected = torch.softmax(logits.double() / model.calibration.value, 1).numpy()
    for r, row in zip(results, expected):
        assert [t["score"] for t in r["top"]] == pytest.approx(sorted(row, reverse=True), abs=1e-5)
        assert isinstance(r["familiar"], bool) and r["novelty"] >= 0
    assert sum(r["familiar"] for r in results) >= 4
    assert rows([finetuned])[0]["ece"] == m["ece"]
    through_api = load_model(finetuned).predict(images, top_k=3, device="cpu")
    assert [(p.scores, p.familiar, p.novelty) for p in through_api] == \
        [([t["score"] for t in r["top"]], r["familiar"], r["novelty"]) for r in results]


def test_images_unlike_the_training_ones_are_unfamiliar_to_a_fine_tuned_model(finetuned, tmp_path):
    for period in range(2, 6):   # black and white checkerboards, unlike the noisy colour patches trained on
        board = np.indices((48, 48)).sum(0) // period % 2 * 255
        Image.fromarray(np.stack([board] * 3, -1).astype(np.uint8)).save(tmp_path / f"board{period}.png")
    results = predict(finetuned, [tmp_path], top_k=1, device="cpu")
    threshold = open_model(finetuned).novelty_threshold
    assert len(results) == 4 and all(not r["familiar"] and r["novelty"] > threshold for r in results)


def test_calibration_and_novelty_quantile_apply_to_finetune(images, tmp_path):
    out = tmp_path / "plain"
    cli_in_process("finetune", images, "--out", out, "--strategy", "head", "--epochs", 1, "--image-size", 64,
                   "--batch-size", 12, "--workers", 0, "--device", "cpu", "--quiet", "--calibration", "none",
                   "--novelty-quantile", 0.5, check=True)
    m = json.loads((out / "metrics.json").read_text())
    assert m["ece"] == m["ece_uncalibrated"] and "calibration" not in modeldir.read_info(out)
    results = predict(out, [images / "val"], top_k=1, device="cpu")
    familiar = sum(r["familiar"] for r in results)
    assert 4 <= familiar <= 5 and len(results) == 9   # the val images' median novelty is the threshold
