"""`pipeline audit` on a multi-label cache of generated mosaics: a planted missing tag and a planted wrong tag
come first among the tag issues, duplicates and outliers run with labels shown as a|b, the learning curve is in
macro AP, the page says it is a multi-label audit; bad input is one error line."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.auditing.learning_curve import learning_curve
from pipeline.data.demo import write_mosaics
from pipeline.storage.cache import open_cache
from tests.conftest import ROOT, cli_in_process

PLANTED = {"given": "t-shirt", "planted": "trouser"}   # an image showing only t-shirts, tagged trouser instead
COPIED = ("00005.png", "copy-of-00005.png")            # a copy of one mosaic, under its own name and tags


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """150 mosaics of 6 classes at 128 px (the first image tagged only t-shirt retagged trouser, one mosaic
    copied), extracted and audited through the command line."""
    work = tmp_path_factory.mktemp("audit-mosaics")
    labels = write_mosaics(ROOT / "data" / "fashion_mnist_demo.npz", work / "images", 150, classes=6)
    rows = [line.split(",", 1) for line in labels.read_text().splitlines()[1:]]
    image = next(row for row in rows if row[1] == PLANTED["given"])
    image[1] = PLANTED["planted"]
    shutil.copy(labels.parent / COPIED[0], labels.parent / COPIED[1])
    rows.append([Path(COPIED[1]).stem, dict(rows)[Path(COPIED[0]).stem]])
    labels.write_text("id,tags\n" + "\n".join(f"{i},{t}" for i, t in rows) + "\n")
    cache = work / "features.h5"
    cli_in_process("extract", labels.parent, "--labels", labels, "--label-column", "tags", "--multi-label", "--out",
                   cache, "--image-size", 128, "--workers", 0, "--quiet", check=True)
    done = cli_in_process("audit", cache, "--out", work / "report", "--seeds", 2, check=True)
    return {"cache": cache, "report": work / "report", "image": f"{image[0]}.png", "tags": dict(rows),
            "log": done.stdout + done.stderr}


def test_a_planted_missing_tag_and_wrong_tag_come_first(planted):
    columns, rows = read_csv(planted["report"] / "label_issues.csv")
    assert columns == ["path", "split", "labels", "class", "issue", "probability", "score"]
    first = [(r["path"], r["class"], r["issue"]) for r in rows[:3]]
    assert (planted["image"], PLANTED["given"], "missing") in first, rows[:5]
    assert (planted["image"], PLANTED["planted"], "wrong") in first, rows[:5]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.9   # the default --issue-score
    for r in rows:
        given = r["labels"].split("|")
        assert (r["class"] in given) == (r["issue"] == "wrong")
        assert float(r["score"]) == pytest.approx(1 - float(r["probability"]) if r["issue"] == "wrong"
                                                  else float(r["probability"]), abs=2e-4)
    summary = json.loads((planted["report"] / "summary.json").read_text())
    assert summary["multi_label"] and summary["label_issues"] == len(rows)
    assert summary["missing_tags"] == sum(r["issue"] == "missing" for r in rows)
    assert summary["wrong_tags"] == sum(r["issue"] == "wrong" for r in rows)
    assert set(summary["label_issue_classifier"]) >= {"out_of_fold_macro_ap", "macro_ap_on_unlisted", "judged"}
    assert f"{summary['missing_tags']} missing and {summary['wrong_tags']} wrong tags" in planted["log"]
    assert f"{len(rows)} label issues ({summary['missing_tags']} missing, {summary['wrong_tags']} wrong tags)" in \
        planted["log"]


def test_duplicates_and_outliers_show_labels_joined(planted):
    _, duplicates = read_csv(planted["report"] / "duplicates.csv")
    groups = {}
    for r in duplicates:
        groups.setdefault(r["group"], set()).add(r["path"])
    assert set(COPIED) in groups.values()
    _, outliers = read_csv(planted["report"] / "outliers.csv")
    assert len(outliers) == len(planted["tags"])
    assert all(set(r["label"].split("|")) == set(planted["tags"][Path(r["path"]).stem].split("|")) for r in outliers)
    assert any("|" in r["label"] for r in outliers)
    assert all(r["score"] and float(r["score_in_class"]) > 0 for r in outliers)


def test_the_learning_curve_is_in_macro_ap(planted):
    columns, rows = read_csv(planted["report"] / "learning_curve.csv")
    summary = json.loads((planted["report"] / "summary.json").read_text())
    assert summary["learning_curve_score"] == "macro AP" and summary["settings"]["eval_split"] == "test"
    with open_cache(planted["cache"]) as cache:
        train, test = cache.read("train"), cache.read("test")
    everything = [r for r in rows if r["head"] == "logreg"][-1]
    assert int(everything["per_class"]) == train.labels.sum(0).max() and everything["runs"] == "1"
    last = learning_curve(train.features, train.labels, test.features, test.labels, heads=("logreg",), seeds=1)[-1]
    assert float(everything["mean"]) == pytest.approx(last.mean, abs=1e-4)
    assert 0.7 <= last.mean <= 1
    knn_scores = [float(r["mean"]) for r in rows if r["head"] == "knn"]
    assert knn_scores[-1] > knn_scores[0]   # more labels, a better head
    assert (planted["report"] / "learning_curve.png").stat().st_size > 0


def test_the_page_says_it_is_a_multi_label_audit(planted):
    page = (planted["report"] / "index.html").read_text()
    assert "Data audit (multi-label)" in page and "A multi-label audit" in page
    assert "missing tag" in page and "wrong tag" in page and "mean macro AP" in page
    summary = json.loads((planted["report"] / "summary.json").read_text())
    assert f"{summary['missing_tags']:,} missing, {summary['wrong_tags']:,} wrong" in page
    assert page.index(planted["image"]) < page.index('id="duplicates"')


def _relabelled(planted: dict, folder: Path, tags) -> Path:
    """A copy of the planted cache, extracted again (every vector reused) with `tags(id)` as each image's tags."""
    labels = folder / "labels.csv"
    labels.write_text("id,tags\n" + "".join(f"{i},{tags(i)}\n" for i in planted["tags"]))
    cache = folder / "features.h5"
    shutil.copy(planted["cache"], cache)
    cli_in_process("extract", planted["cache"].parent / "images", "--labels", labels, "--label-column", "tags",
                   "--multi-label", "--out", cache, "--image-size", 128, "--workers", 0, "--quiet", check=True)
    return cache


def test_bad_input_is_one_error_line_and_writes_nothing(planted, tmp_path):
    first = next(iter(planted["tags"]))
    single = _relabelled(planted, tmp_path, lambda i: planted["tags"][i] if i == first else "")
    for args, message in (((planted["cache"], "--neighbours", 500), "--neighbours must be below the number of "
                           "images (151)"),
                          ((single,), "has no class with two images; nothing to audit")):
        done = cli_in_process("audit", *args, "--out", tmp_path / "report")
        assert done.returncode == 2 and done.stderr.startswith("error:") and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "report").exists()
