"""`pipeline audit`: planted label errors, near-duplicates across splits and outliers are found in real
caches of controlled vectors; the files keep their columns; bad input is one error line."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.auditing import neighbours, pixels
from pipeline.auditing.label_issues import find_label_issues, l2_normalised, out_of_fold_probabilities
from pipeline.auditing.learning_curve import counts_up_to, learning_curve
from pipeline.auditing.run import audit
from pipeline.auditing.settings import AuditSettings
from pipeline.storage.cache import open_cache
from tests.conftest import cli_in_process, make_image_folder, synthetic_cache

COLUMNS = {"label_issues.csv": ["path", "split", "given", "suggested", "score"],
           "duplicates.csv": ["group", "path", "split", "similarity", "pixel_correlation", "leak", "found_by"],
           "outliers.csv": ["path", "split", "label", "score", "flagged", "score_in_class", "score_overall",
                            "distance_to_classes"],
           "learning_curve.csv": ["head", "per_class", "mean", "std", "runs"]}


def clusters(n_classes: int, per_class: int, dim: int = 32, spread: float = 0.6, seed: int = 0):
    """Gaussian classes around random centres: vectors and labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_classes, dim))
    y = np.repeat(np.arange(n_classes), per_class)
    return (centres[y] + rng.normal(0, spread, (len(y), dim))).astype(np.float32), y


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_confident_learning_ranks_planted_label_flips_first():
    X, y = clusters(5, 100, spread=0.6)
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(y), 25, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 5, len(flipped))) % 5
    issues = find_label_issues(out_of_fold_probabilities(X, noisy, 5, folds=3), noisy)
    top = issues.rows[:2 * len(flipped)]
    assert np.isin(flipped, top).mean() >= 0.8
    assert (issues.suggested[flipped] == y[flipped]).mean() >= 0.8   # the suggestion is the true class
    assert np.all(np.diff(issues.score[issues.rows]) <= 0) and 0 <= issues.score.min() <= issues.score.max() <= 1


def test_clean_labels_give_few_issues():
    X, y = clusters(4, 50, spread=0.3)
    issues = find_label_issues(out_of_fold_probabilities(X, y, 4, folds=3), y)
    assert len(issues.rows) <= 2


def test_inverted_file_search_finds_the_exact_neighbours():
    X = l2_normalised(clusters(20, 150, dim=24, spread=0.5)[0])
    exact_sims, exact_idx = neighbours.knn(X, 5)
    sims, idx = neighbours.knn(X, 5, exact_up_to=100)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact_idx, idx)])
    assert recall >= 0.9
    assert np.all(sims <= exact_sims + 1e-5)     # never closer than the true neighbours
    assert not np.any(idx == np.arange(len(X))[:, None])


def test_exact_search_in_blocks_matches_the_full_matrix(monkeypatch):
    X = l2_normalised(clusters(3, 40)[0])
    monkeypatch.setattr(neighbours, "BLOCK_BYTES", 4 * len(X) * 7)   # blocks of 7 rows
    sims, idx = neighbours.knn(X, 3)
    full = X @ X.T
    np.fill_diagonal(full, -np.inf)
    np.testing.assert_allclose(sims, np.sort(full, 1)[:, ::-1][:, :3], atol=1e-5)


def test_learning_curve_rises_with_more_labels():
    assert counts_up_to(130) == [1, 2, 5, 10, 20, 50, 100, 130]
    assert counts_up_to(50) == [1, 2, 5, 10, 20, 50]
    X, y = clusters(3, 70, dim=16, spread=1.5)
    points = learning_curve(X[::2], y[::2], X[1::2], y[1::2], heads=("logreg",), seeds=3)
    assert [p.per_class for p in points] == [1, 2, 5, 10, 20, 35]
    assert [p.runs for p in points] == [3, 3, 3, 3, 3, 1] and points[0].std > 0 == points[-1].std
    assert points[-1].mean > points[0].mean + 0.1


def planted_cache(path: Path) -> tuple[Path, dict]:
    """Three splits of four classes with a label flip, copies of training vectors in val and test, and one
    vector far from everything; returns the cache and what was planted (as the cache's paths)."""
    X, y = clusters(4, 60, dim=32, spread=0.8)
    rng = np.random.default_rng(3)
    order = rng.permutation(len(y))
    parts = {"train": order[:160], "val": order[160:200], "test": order[200:]}
    splits = {name: (X[rows].copy(), y[rows].copy()) for name, rows in parts.items()}
    Xt, yt = splits["train"]
    flips = [int(np.flatnonzero(yt == label)[0]) for label in range(4)]   # one of each class
    yt[flips] = (yt[flips] + 1) % 4
    for split, source in (("val", 30), ("test", 31)):              # copies of train/30 and train/31
        Xs, _ = splits[split]
        Xs[0] = Xt[source] + rng.normal(0, 0.02, Xt.shape[1])
        splits[split][1][0] = yt[source]
    Xt[20] = rng.normal(0, 1, Xt.shape[1]) * 6                    # an outlier: train/20
    planted = {"flips": {f"train/{i}.png" for i in flips}, "leaks": {("train/30.png", "val/0.png"),
               ("test/0.png", "train/31.png")}, "outlier": "train/20.png"}
    return synthetic_cache(path, splits, ["a", "b", "c", "d"]), planted


def test_audit_finds_what_was_planted_and_writes_the_contract(tmp_path: Path):
    cache, planted = planted_cache(tmp_path / "features.h5")
    summary = audit(cache, tmp_path / "report", AuditSettings(folds=3, seeds=2))
    files = {}
    for name, columns in COLUMNS.items():
        header, files[name] = read_csv(tmp_path / "report" / name)
        assert header == columns
    issues = [r["path"] for r in files["label_issues.csv"]]
    assert planted["flips"] <= set(issues[:8])
    groups = {}
    for r in files["duplicates.csv"]:
        groups.setdefault(r["group"], []).append(r)
    pairs = {tuple(sorted(r["path"] for r in members)) for members in groups.values()}
    assert pairs == planted["leaks"]
    assert all(r["leak"] == "true" and float(r["similarity"]) >= AuditSettings().duplicate_threshold
               for r in files["duplicates.csv"])
    ranking = files["outliers.csv"]          # every image, most unusual first, the flagged ones on top
    assert ranking[0]["path"] == planted["outlier"] and ranking[0]["flagged"] == "true" and len(ranking) == 240
    scores = [float(r["score"]) for r in ranking]
    assert scores == sorted(scores, reverse=True)
    assert [r["flagged"] == "true" for r in ranking] == [v >= AuditSettings.outlier_cut for v in scores]
    curve = files["learning_curve.csv"]
    with open_cache(cache) as written:
        largest = np.bincount(written.read("train").labels).max()   # all images of the largest class
    assert {r["head"] for r in curve} == {"logreg", "knn"} and curve[-1]["per_class"] == str(largest)
    assert all(0 <= float(r["mean"]) <= 1 for r in curve)
    assert (tmp_path / "report" / "learning_curve.png").stat().st_size > 0
    assert json.loads((tmp_path / "report" / "summary.json").read_text()) == summary
    assert summary["splits"] == {"train": 160, "val": 40, "test": 40} and summary["images"] == 240
    assert (summary["label_issues"], summary["duplicate_groups"], summary["leak_groups"]) == (len(issues), 2, 2)
    assert summary["outliers"] == sum(r["flagged"] == "true" for r in ranking) and summary["data_root"] is None
    classifier = summary["label_issue_classifier"]
    assert 0.9 < classifier["out_of_fold_accuracy"] <= 1 and 0 <= classifier["calibration_error"] < 0.2
    assert summary["settings"]["duplicate_threshold"] == AuditSettings.duplicate_threshold


@pytest.mark.slow
def test_audit_command_writes_the_page(tmp_path: Path):
    cache, _ = planted_cache(tmp_path / "features.h5")
    proc = cli_in_process("audit", cache, "--out", tmp_path / "report", "--folds", 3, "--seeds", 1, check=True)
    assert "2 near-duplicate groups (2 across splits)" in proc.stderr
    for name in (*COLUMNS, "summary.json", "learning_curve.png", "index.html"):
        assert (tmp_path / "report" / name).is_file()


@pytest.mark.parametrize("args, message", [
    (["missing.h5"], "error: feature cache missing.h5 does not exist; run `pipeline extract` first"),
    (["CACHE", "--folds", "1"], "error: --folds must be at least 2, got 1"),
    (["CACHE", "--duplicate-threshold", "1.5"], "error: --duplicate-threshold must be at most 1, got 1.5"),
])
def test_audit_command_refuses_bad_input_with_one_line(tmp_path: Path, args, message):
    cache, _ = planted_cache(tmp_path / "features.h5")
    args = [cache if a == "CACHE" else a for a in args]
    proc = cli_in_process("audit", *args, "--out", tmp_path / "report", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == message
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
def test_extract_leaves_out_the_images_an_exclude_list_names(tmp_path: Path):
    images = make_image_folder(tmp_path / "images", {"train": 4, "val": 2})
    listed = tmp_path / "label_issues.csv"   # an edited report: any columns, the 'path' one counts
    listed.write_text("path,split,given\ntrain/red/train_0.png,train,red\nval/blue/val_1.png,val,blue\n"
                      "train/red/gone.png,train,red\n")
    out = tmp_path / "features.h5"
    proc = cli_in_process("extract", images, "--out", out, "--exclude", listed, "--image-size", 32, "--workers", 0,
                   "--quiet", check=True)
    assert "warning: 1 paths of label_issues.csv are not among the images" in proc.stderr
    with open_cache(out) as cache:
        assert sorted(cache.skipped) == [("train/red/train_0.png", "excluded"), ("val/blue/val_1.png", "excluded")]
        kept = [p for split in cache.splits for p in cache.read(split).paths]
    assert len(kept) == 16 and "train/red/train_0.png" not in kept

    listed.write_text("file\ntrain/red/train_0.png\n")
    proc = cli_in_process("extract", images, "--out", tmp_path / "other.h5", "--exclude", listed)
    assert proc.returncode == 2 and proc.stderr.strip() == (f"error: {listed} has no 'path' column "
                                                            f"(columns: file)")
    assert not (tmp_path / "other.h5").exists()


def smooth_field(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A random picture of soft blobs: unlike any other such picture, pixel by pixel."""
    coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


def test_pairs_under_the_threshold_are_near_duplicates_when_their_pixels_match(tmp_path: Path):
    """Two pairs of similar vectors, below the threshold: the one whose images are a copy (re-encoded
    at JPEG quality 30 and mirrored) is a leak found by its pixels, the other is not; without the images only
    the vectors decide."""
    rng = np.random.default_rng(5)
    X, y = clusters(2, 45, dim=64, spread=1.5)
    order = rng.permutation(len(y))
    splits = {"train": (X[order[:60]], y[order[:60]]), "val": (X[order[60:]], y[order[60:]])}
    for row in (0, 1):     # val/0 near train/0, val/1 near train/1
        splits["val"][0][row] = splits["train"][0][row] + rng.normal(0, 1.4, X.shape[1])
    root = tmp_path / "images"
    for split, (_, labels) in splits.items():
        (root / split).mkdir(parents=True)
        for i in range(len(labels)):
            smooth_field(rng).save(root / split / f"{i}.png")
    copy = io.BytesIO()
    ImageOps.mirror(Image.open(root / "train" / "0.png")).save(copy, "JPEG", quality=30)
    Image.open(copy).save(root / "val" / "0.png")
    cache = synthetic_cache(tmp_path / "features.h5", splits, ["a", "b"], data_root=root)

    settings = AuditSettings(folds=2, seeds=1)
    sims, idx = neighbours.knn(neighbours.search_space(np.concatenate([X for X, _ in splits.values()])), 10)
    for row in (0, 1):     # both planted pairs are neighbours between the pixel check and the threshold
        similarity = sims[row][idx[row] == 60 + row]
        assert len(similarity) and settings.pixel_check_from <= similarity[0] < settings.duplicate_threshold

    summary = audit(cache, tmp_path / "report", settings)
    _, rows = read_csv(tmp_path / "report" / "duplicates.csv")
    assert [(r["path"], r["leak"], r["found_by"]) for r in rows if r["path"] in ("train/0.png", "val/0.png")] == \
        [("train/0.png", "true", "pixels"), ("val/0.png", "true", "pixels")]
    assert not {"train/1.png", "val/1.png"} & {r["path"] for r in rows}
    check = summary["pixel_check"]
    assert check["confirmed"] >= 1 and check["checked"] >= 2 and check["skipped"] is None
    assert check["unreadable_images"] == 0

    shutil.rmtree(root)
    summary = audit(cache, tmp_path / "report", settings)
    _, rows = read_csv(tmp_path / "report" / "duplicates.csv")
    assert not {"train/0.png", "val/0.png"} & {r["path"] for r in rows}
    assert summary["pixel_check"]["skipped"] == f"data folder {root.resolve()} not reachable"


def test_aligned_pixels_match_cropped_copies_and_not_look_alikes():
    """Copies cut from a corner or a side, rescaled, re-encoded at JPEG quality 30-50 or mirrored correlate
    from the pixel match once aligned; two handwritten 1s and the two lower quadrants of a photo do not."""
    import skimage.data
    from sklearn.datasets import load_digits

    from benchmarks.audit import _corner_crop, _jpeg, _scaled, _side_crop, digit_image
    photo = Image.fromarray(skimage.data.astronaut())
    copies = [_jpeg(_corner_crop(photo, 0.08, 3), 35), _side_crop(_scaled(photo, 0.6), 0.1, 0),
              ImageOps.mirror(_corner_crop(photo, 0.05, 0)), _jpeg(_scaled(_corner_crop(photo, 0.03, 1), 0.7), 50)]
    digits = load_digits()
    ones = [digit_image(x) for x in digits.images[digits.target == 1][:2]]
    w, h = photo.size
    quadrants = [photo.crop((0, h // 2, w // 2, h)), photo.crop((w // 2, h // 2, w, h))]
    thumb = pixels.thumbnail
    same = pixels.aligned_correlation(np.stack([thumb(photo)] * len(copies)), np.stack([thumb(c) for c in copies]))
    assert np.all(same >= AuditSettings.pixel_match), same
    distinct = pixels.aligned_correlation(np.stack([thumb(ones[0]), thumb(quadrants[0])]),
                                          np.stack([thumb(ones[1]), thumb(quadrants[1])]))
    assert np.all(distinct < AuditSettings.pixel_match), distinct


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory) -> tuple[Path, dict]:
    """The audit of scikit-learn's 1,797 handwritten digits written as 64 px PNGs (EfficientNet-Lite0 at
    64 px): real images whose labels are nearly all right and of which no two are copies."""
    from benchmarks.audit import write_digits
    from pipeline.features.extract import extract_folder
    from pipeline.features.settings import ExtractSettings
    root = tmp_path_factory.mktemp("digits")
    images = write_digits(root / "images")
    extract_folder(images, root / "features.h5", ExtractSettings(image_size=64, workers=0), quiet=True)
    summary = audit(root / "features.h5", root / "report", AuditSettings(seeds=1))
    return root / "report", summary


@pytest.mark.slow
def test_clean_digits_give_few_duplicates_and_say_how_far_labels_can_be_judged(digits_report):
    report, summary = digits_report
    _, duplicates = read_csv(report / "duplicates.csv")
    assert summary["images"] == 1797 and len(duplicates) <= 0.01 * 1797, duplicates
    _, ranking = read_csv(report / "outliers.csv")
    assert len(ranking) == 1797
    classifier = summary["label_issue_classifier"]
    assert classifier["judged"] == (classifier["accuracy_on_unlisted"] >= classifier["minimum_accuracy"]
                                    and classifier["calibration_error"] <= classifier["maximum_calibration_error"])
    assert classifier["accuracy_on_unlisted"] >= classifier["out_of_fold_accuracy"]
