"""The comparison: classifier rows and fine-tune rows side by side, never across datasets, ranked by the
score their selection used (never by the evaluation split), with 95% intervals and a readable plot."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.text import Text

from pipeline.tuning.training import FinetuneSettings, finetune
from pipeline.heads.settings import train_settings
from pipeline.heads.train import train
from pipeline.report.compare import figure, markdown, rows
from pipeline.runtime.errors import InputError
from tests.conftest import cli_in_process, synthetic_cache

TINY = FinetuneSettings(strategy="head", epochs=1, image_size=64, batch_size=12, workers=0, device="cpu")


@pytest.fixture(scope="module")
def models(small_cache, tmp_path_factory) -> Path:
    """models/logreg on the shared cache and models/ft_head fine-tuned on the same images."""
    root = tmp_path_factory.mktemp("models")
    cli_in_process("train", small_cache, "--classifier", "logreg", "--out", root / "logreg", "--quiet", check=True)
    finetune(small_cache.parent / "images", root / "ft_head", TINY, quiet=True)
    return root


def test_compare_puts_classifiers_and_fine_tunes_in_one_table(models, tmp_path):
    proc = cli_in_process("compare", models, "--out", tmp_path, check=True)
    table = json.loads((tmp_path / "compare.json").read_text())
    by_name = {r["name"]: r for r in table}
    assert set(by_name) == {"logreg", "ft_head"}
    logreg, head = by_name["logreg"], by_name["ft_head"]
    assert logreg["extract_seconds"] > 0
    assert logreg["total_seconds"] == pytest.approx(logreg["extract_seconds"] + logreg["train_seconds"])
    assert head["extract_seconds"] is None and head["total_seconds"] == head["train_seconds"]
    assert logreg["swap_speedup"] == pytest.approx(head["train_seconds"] / logreg["train_seconds"])
    assert "| ft_head | efficientnet_lite0 64px | head |" in proc.stdout
    ft_row = next(line for line in proc.stdout.splitlines() if "| ft_head |" in line)
    assert 0 <= head["ece"] <= 1 and f"| {head['ece']:.3f} |" in ft_row   # fine-tunes are calibrated too
    assert "| logreg | efficientnet_lite0 64px | logreg |" in proc.stdout
    assert "swap speed-up" in proc.stdout.splitlines()[0]
    assert [r["selected"] for r in table] == [True, False]
    assert table[0]["val_score"] >= table[1]["val_score"]
    for r in table:
        lo, hi = r["top1_interval"]
        assert lo <= r["top1"] <= hi and r["n_eval"] == 12 and r["n_val_scored"] == 12
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_without_a_fine_tune_run_there_is_no_swap_column(models, tmp_path):
    header = cli_in_process("compare", models / "logreg", "--out", tmp_path, check=True).stdout.splitlines()[0]
    assert header.endswith("| test top-1 (95% CI) | balanced acc. | macro F1 | ECE | extraction s | train s "
                           "| total s |")


def test_compare_refuses_runs_on_different_datasets(models, small_cache, tmp_path):
    other = tmp_path / "images"
    shutil.copytree(small_cache.parent / "images", other)
    (other / "train" / "red" / "train_0.png").unlink()      # one training image fewer: another dataset
    finetune(other, tmp_path / "ft_other", TINY, quiet=True)
    for other_run in ([models / "logreg", tmp_path / "ft_other"], [models / "ft_head", tmp_path / "ft_other"]):
        with pytest.raises(InputError, match="different data"):
            rows(other_run)


def test_the_selection_score_picks_the_model_even_where_the_test_split_would_pick_another(tmp_path):
    """Two extractors' caches of the same images: A separates the classes on train and val but not on
    test, B on train and test but less on val. Selection takes A (its val score is higher) and reports
    A's poor test score, although B's test score is the best."""
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]

    def split(n, noise, seed):
        y = np.repeat(np.arange(3), n)
        return (np.eye(3)[y] * 4 + np.random.default_rng(seed).normal(0, noise, (len(y), 3))).astype(np.float32), y

    train_, val, test = split(10, 0.3, 1), split(10, 0.3, 2), split(10, 0.3, 3)
    shuffled_test = (rng.permutation(test[0]), test[1])
    blurred_val = (val[0] + rng.normal(0, 4, val[0].shape).astype(np.float32), val[1])
    caches = {"A": {"train": train_, "val": val, "test": shuffled_test},
              "B": {"train": train_, "val": blurred_val, "test": test}}
    for name, splits in caches.items():
        train(synthetic_cache(tmp_path / f"{name}.h5", splits, classes), tmp_path / "models" / name / "logreg",
              train_settings("logreg", {"preprocess": "none"}))
    table = rows([tmp_path / "models"])
    by_name = {r["name"]: r for r in table}
    a, b = by_name["A/logreg"], by_name["B/logreg"]
    assert a["val_score"] > b["val_score"] and a["top1"] < b["top1"]       # test would have picked B
    assert [r["name"] for r in table if r["selected"]] == ["A/logreg"] and table[0] is a
    text = markdown(table)
    assert "Selected: **A/logreg**" in text and f"Its test top-1: {a['top1']:.3f}" in text
    assert text.count("| ✓ |") == 1
    assert "The runner-up, B/logreg" in text and "is outside the selected model's 95% interval" in text


def test_the_report_says_when_the_runner_up_is_within_the_interval(tmp_path):
    """Two classifiers on one easy cache both score 1.0 on its 15 val images: a tie the report names."""
    easy = {split: (np.repeat(np.eye(3, dtype=np.float32), n, 0) * 4, np.repeat(np.arange(3), n))
            for split, n in (("train", 8), ("val", 5), ("test", 5))}
    cache = synthetic_cache(tmp_path / "easy.h5", easy, ["a", "b", "c"])
    for classifier in ("logreg", "knn"):
        train(cache, tmp_path / "models" / classifier, train_settings(classifier, {}))
    table = rows([tmp_path / "models"])
    assert [r["val_score"] for r in table] == [1.0, 1.0] and table[0]["val_interval"][0] < 1.0
    assert f"The runner-up, {table[1]['name']} (1.000), is within the selected model's 95% interval" in markdown(table)


def test_the_plot_has_no_empty_legend_entry_and_no_overlapping_labels(models):
    table = rows([models / "logreg"])
    legend = [t.get_text() for t in figure(table).axes[0].get_legend().get_texts()]
    assert sorted(legend) == ["feature cache + classifier (extraction included)", "selected: logreg"]

    for count in (6, 40):     # models on one spot: each named once, no two names overlap, all inside the figure
        crowded = [dict(table[0], name=f"lite0_{i}/logistic_regression", selected=False) for i in range(count)]
        fig = figure(crowded)
        fig.canvas.draw()     # places the names
        renderer = fig.canvas.get_renderer()
        boxes = [Text.get_window_extent(t, renderer) for t in fig.axes[0].texts]
        assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(r["name"] for r in crowded)
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        assert all(fig.bbox.contains(b.x0, b.y0) and fig.bbox.contains(b.x1, b.y1) for b in boxes)
