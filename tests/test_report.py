"""The comparison: classifier rows and fine-tune rows side by side, never across datasets."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pipeline.finetune.training import FinetuneSettings, finetune
from pipeline.report.compare import rows

from pipeline.runtime.errors import UserError
from tests.conftest import run_cli

TINY = FinetuneSettings(strategy="head", epochs=1, image_size=64, batch_size=12, workers=0, device="cpu")


@pytest.fixture(scope="module")
def models(small_cache, tmp_path_factory) -> Path:
    """models/logreg on the shared cache and models/ft_head fine-tuned on the same images."""
    root = tmp_path_factory.mktemp("models")
    run_cli("train", small_cache, "--classifier", "logreg", "--out", root / "logreg", "--quiet", check=True)
    finetune(small_cache.parent / "images", root / "ft_head", TINY, quiet=True)
    return root


def test_compare_puts_classifiers_and_fine_tunes_in_one_table(models, tmp_path):
    proc = run_cli("compare", models, "--out", tmp_path, check=True)
    table = json.loads((tmp_path / "compare.json").read_text())
    by_name = {r["name"]: r for r in table}
    assert set(by_name) == {"logreg", "ft_head"}
    logreg, head = by_name["logreg"], by_name["ft_head"]
    assert logreg["extract_seconds"] > 0
    assert logreg["total_seconds"] == pytest.approx(logreg["extract_seconds"] + logreg["train_seconds"])
    assert head["extract_seconds"] is None and head["total_seconds"] == head["train_seconds"]
    assert logreg["swap_speedup"] == pytest.approx(head["train_seconds"] / logreg["train_seconds"])
    assert "| ft_head | head |" in proc.stdout and "| logreg | logreg |" in proc.stdout
    assert "swap speed-up" in proc.stdout.splitlines()[0]
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_without_a_fine_tune_run_there_is_no_swap_column(models, tmp_path):
    header = run_cli("compare", models / "logreg", "--out", tmp_path, check=True).stdout.splitlines()[0]
    assert header.endswith("| total s | evaluated on |")


def test_compare_refuses_runs_on_different_datasets(models, small_cache, tmp_path):
    other = tmp_path / "images"
    shutil.copytree(small_cache.parent / "images", other)
    (other / "train" / "red" / "train_0.png").unlink()      # one training image fewer: another dataset
    finetune(other, tmp_path / "ft_other", TINY, quiet=True)
    for other_run in ([models / "logreg", tmp_path / "ft_other"], [models / "ft_head", tmp_path / "ft_other"]):
        with pytest.raises(UserError, match="different data"):
            rows(other_run)
