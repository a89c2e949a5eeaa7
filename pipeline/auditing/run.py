"""`pipeline audit`: every finding on one feature cache, written as CSV files, a plot and summary.json.

out_dir/label_issues.csv    path, split, given, suggested, score (most likely error first; score in [0, 1]);
                            on a multi-label cache one row per (image, class): path, split, labels, class,
                            issue (missing or wrong), probability, score (pipeline.auditing.tag_issues)
out_dir/duplicates.csv      group, path, split, similarity, pixel_correlation, leak, found_by (groups spanning
                            two splits first)
out_dir/outliers.csv        path, split, label (a multi-label image's labels joined by '|'), score, flagged, score_in_class, score_overall,
                            distance_to_classes: every image, most unusual first
out_dir/learning_curve.csv  head, per_class, mean, std, runs (accuracy on the evaluation split; macro AP on a
                            multi-label cache)
out_dir/learning_curve.png
out_dir/summary.json        counts, classes, splits, the cache, its data folder and the settings
out_dir/index.html, thumbs/ the report page, where the caller passes `page` (pipeline.report.audit_page)
Paths are relative to the data folder, as the cache stores them. Nothing is written before every
finding is computed; then the whole folder is written beside `out_dir` and renamed over it
(`files.staged_folder`), so a previous report stays whole until the new one is, and a folder holding
files the audit did not write is refused before any work.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.auditing import label_issues, learning_curve, neighbours, outliers, pixels, tag_issues
from pipeline.auditing.settings import AuditSettings
from pipeline.runtime.errors import InputError
from pipeline.runtime.files import check_owned, staged_folder, write_atomically
from pipeline.runtime.settings import validate
from pipeline.storage.cache import open_cache


TAG_ISSUE_COLUMNS = ["path", "split", "labels", "class", "issue", "probability", "score"]


@dataclass
class Images:
    """Every row of a cache, all splits together."""
    features: np.ndarray   # [N, D] L2-normalised
    labels: np.ndarray
    paths: np.ndarray
    splits: np.ndarray


def read_images(cache) -> Images:
    parts = [cache.read(split) for split in cache.splits]
    return Images(label_issues.l2_normalised(np.concatenate([p.features for p in parts])),
                  np.concatenate([p.labels for p in parts]),
                  np.array([path for p in parts for path in p.paths], dtype=object),
                  np.array([s for s, p in zip(cache.splits, parts) for _ in p.paths], dtype=object))


def audit(cache_path: Path, out_dir: Path, s: AuditSettings | None = None,
          log: Callable[[str], None] = lambda line: None, page: Callable[[Path], object] | None = None) -> dict:
    """Compute every finding of the cache at `cache_path`, then write them to `out_dir`; returns the summary.
    `page` writes the report page into the folder before it replaces `out_dir` (`report.audit_page.write_page`,
    given by the caller: the report layer sits above this one).
    Why so long: the findings are computed in one pass over one read of the cache, each a call, and their
    results are written together so that a failure leaves `out_dir` as it was."""
    s = s or AuditSettings()
    s = validate(s)
    out_dir = Path(out_dir)
    check_owned(out_dir, "audit report")
    with open_cache(cache_path) as cache:
        images = read_images(cache)
        classes, splits, data_root, multi_label = cache.classes, cache.splits, cache.data_root, cache.multi_label
    if s.neighbours >= len(images.labels):
        raise InputError(f"--neighbours must be below the number of images ({len(images.labels)}), got {s.neighbours}")
    if outliers.membership(images.labels).sum(0).max() < 2:
        raise InputError(f"feature cache {cache_path} has no class with two images; nothing to audit")

    issues, trust = _label_issues(images, len(classes), s, log)
    start = time.perf_counter()
    search = {"exact_up_to": s.exact_up_to, "seed": s.seed}
    pairs = neighbours.neighbour_pairs(*neighbours.knn(neighbours.search_space(images.features), s.neighbours,
                                                       **search), min(s.pixel_check_from, s.duplicate_threshold))
    pairs, pixel_check = pixels.confirm(pairs, s.duplicate_threshold, s.pixel_match,
                                        pixels.PixelCheck(data_root, images.paths))
    duplicates = neighbours.duplicate_groups(pairs, images.splits)
    unusual = outliers.scores(images.features, images.labels, s.neighbours, **search)
    ranking = unusual.ranking()
    flagged = unusual.score[ranking] >= s.outlier_cut
    leak_groups = len(set(duplicates.group[duplicates.leak]))
    log(f"neighbours: {len(set(duplicates.group))} near-duplicate groups ({leak_groups} across splits), "
        f"{int(flagged.sum())} outliers in {time.perf_counter() - start:.1f}s; " + _pixel_line(pixel_check))

    start = time.perf_counter()
    eval_split = next((split for split in ("test", "val") if split in splits), None)
    score = learning_curve.measure(images.labels)
    train = images.splits == "train"
    points = []
    if eval_split:
        held = images.splits == eval_split
        points = learning_curve.learning_curve(images.features[train], images.labels[train], images.features[held],
                                               images.labels[held], seeds=s.seeds, C=s.C)
    log(f"learning curve: {len(points)} points of {score}"
        + (f" on {eval_split}" if eval_split else ", no val or test split")
        + f" in {time.perf_counter() - start:.1f}s")

    summary = {"cache": str(cache_path), "data_root": data_root, "images": len(images.labels),
               "splits": {split: int((images.splits == split).sum()) for split in splits},
               "classes": classes, "multi_label": multi_label, "label_issues": len(issues.rows),
               **({"missing_tags": int(issues.missing.sum()), "wrong_tags": int((~issues.missing).sum())}
                  if multi_label else {}),
               "label_issue_classifier": trust.as_dict(),
               "duplicate_groups": len(set(duplicates.group)), "leak_groups": leak_groups,
               "pixel_check": pixel_check, "outliers": int(flagged.sum()), "learning_curve_score": score,
               "settings": {**asdict(s), "eval_split": eval_split,
                            "learning_curve_heads": list(learning_curve.HEADS)}}
    with staged_folder(out_dir, "audit report") as folder:
        _write_report(folder, images, issues, duplicates, (unusual, ranking, flagged), (points, eval_split, score),
                      classes)
        write_atomically(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
        if page:
            page(folder)
    return summary


def _label_issues(images: Images, n_classes: int, s: AuditSettings, log: Callable[[str], None]) -> tuple:
    """The label issues (per image, or per (image, class) on a multi-label cache) and the trust of their
    classifier, from out-of-fold probabilities."""
    start = time.perf_counter()
    probabilities = label_issues.out_of_fold_probabilities(images.features, images.labels, n_classes, s.folds,
                                                           s.C, s.seed)
    if images.labels.ndim == 2:
        issues = tag_issues.find_tag_issues(probabilities, images.labels, s.issue_score)
        trust = tag_issues.trust(issues, images.labels)
        log(f"label issues: {int(issues.missing.sum())} missing and {int((~issues.missing).sum())} wrong tags on "
            f"{len(set(issues.rows))} of {len(images.labels)} images, {s.folds}-fold out-of-fold one-vs-rest "
            f"probabilities in {time.perf_counter() - start:.1f}s; out-of-fold macro AP {trust.macro_ap:.3f}, "
            f"calibration error {trust.calibration_error:.3f}"
            + ("" if trust.judged else ": too weak a classifier to call them tag errors"))
        return issues, trust
    issues = label_issues.find_label_issues(probabilities, images.labels, s.issue_score)
    trust = label_issues.trust(issues, images.labels)
    log(f"label issues: {len(issues.rows)} of {len(images.labels)} images, {s.folds}-fold out-of-fold "
        f"probabilities in {time.perf_counter() - start:.1f}s; out-of-fold accuracy {trust.accuracy:.3f}, "
        f"calibration error {trust.calibration_error:.3f}"
        + ("" if trust.judged else ": too weak a classifier to call them label errors"))
    return issues, trust


def label_names(labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """Each image's label by name; a multi-label image's labels joined by '|' (empty for none)."""
    names = np.array(classes, dtype=object)
    if labels.ndim == 2:
        return np.array(["|".join(names[row.astype(bool)]) for row in labels], dtype=object)
    return names[labels]


def _write_report(folder: Path, images: Images, issues, duplicates, ranked: tuple, curve: tuple,
                  classes: list[str]) -> None:
    """The CSVs and the learning curve's plot. `ranked`: the outlier scores of every row, their ranking and which
    ranked rows are flagged; `curve`: the learning curve's points, the split they were measured on and their
    score."""
    unusual, ranking, flagged = ranked
    points, eval_split, score = curve
    given, names = label_names(images.labels, classes), np.array(classes, dtype=object)
    if images.labels.ndim == 2:
        rows = issues.rows
        _write(folder / "label_issues.csv", TAG_ISSUE_COLUMNS,
               zip(images.paths[rows], images.splits[rows], given[rows], names[issues.classes],
                   np.where(issues.missing, "missing", "wrong"),
                   _rounded(issues.probabilities[rows, issues.classes]), _rounded(issues.score)))
    else:
        _write(folder / "label_issues.csv", ["path", "split", "given", "suggested", "score"],
               zip(images.paths[issues.rows], images.splits[issues.rows], given[issues.rows],
                   names[issues.suggested[issues.rows]], _rounded(issues.score[issues.rows])))
    rows = duplicates.rows
    _write(folder / "duplicates.csv", ["group", "path", "split", "similarity", "pixel_correlation", "leak",
                                       "found_by"],
           zip(duplicates.group, images.paths[rows], images.splits[rows], _rounded(duplicates.similarity),
               _rounded(duplicates.correlation), np.where(duplicates.leak, "true", "false"),
               np.where(duplicates.by_pixels, "pixels", "features")))
    _write(folder / "outliers.csv", ["path", "split", "label", "score", "flagged", "score_in_class",
                                     "score_overall", "distance_to_classes"],
           zip(images.paths[ranking], images.splits[ranking], given[ranking],
               _rounded(unusual.score[ranking]), np.where(flagged, "true", "false"),
               *(_rounded(v[ranking]) for v in (unusual.in_class, unusual.overall, unusual.no_content))))
    _write(folder / "learning_curve.csv", ["head", "per_class", "mean", "std", "runs"],
           ((p.head, p.per_class, f"{p.mean:.4f}", f"{p.std:.4f}", p.runs) for p in points))
    learning_curve.plot(points, eval_split or "no evaluation split", folder / "learning_curve.png", score)


def _pixel_line(check: dict) -> str:
    if check["skipped"]:
        return f"pixels not compared: {check['skipped']}"
    line = f"pixels of {check['checked']} pairs under the threshold compared, {check['confirmed']} matched"
    if check["checked"] < check["candidates"]:
        line += f" ({check['candidates'] - check['checked']} less similar pairs not compared)"
    return line + (f", {check['unreadable_images']} images unreadable" if check["unreadable_images"] else "")


def _rounded(values: np.ndarray) -> list[str]:
    return ["" if np.isnan(v) else f"{v:.4f}" for v in np.asarray(values, float)]


def _write(path: Path, header: list[str], rows) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    write_atomically(path, text.getvalue())
