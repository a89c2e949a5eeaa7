"""The audit as one page, index.html, that a browser opens from disk.

It reads only what `pipeline audit` wrote into its folder (summary.json, the four CSVs, learning_curve.png; on a
multi-label audit, summary.json's `multi_label` selects the columns of label_issues.csv)
and the images under the data root that summary.json names, and writes index.html and thumbs/ (small
JPEGs) beside them. The page loads nothing from the network and runs no script. Each table shows its first
ROWS_SHOWN rows (for duplicates: groups, leaks first, MEMBERS_SHOWN images each) and links the full CSV.
Every path, label and setting is user data and is HTML-escaped.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from html import escape
from pathlib import Path

from pipeline.data.images import ImageError, file_under, read_image
from pipeline.runtime.errors import InputError
from pipeline.runtime.files import write_atomically
from pipeline.runtime.reading import Field, read_json

ROWS_SHOWN = 100      # rows per table (duplicate groups for duplicates.csv); the CSVs hold all of them
OUTLIERS_BELOW = 20   # images shown after the flagged outliers, the next in the ranking
MEMBERS_SHOWN = 12    # images shown per duplicate group
THUMB_SIZE = 96       # longest side of a thumbnail, in pixels

COLUMNS = {
    "label_issues.csv": ("path", "split", "given", "suggested", "score"),
    "duplicates.csv": ("group", "path", "split", "similarity", "pixel_correlation", "leak", "found_by"),
    "outliers.csv": ("path", "split", "label", "score", "flagged", "score_in_class", "score_overall",
                     "distance_to_classes"),
    "learning_curve.csv": ("head", "per_class", "mean", "std", "runs"),
}
TAG_ISSUE_COLUMNS = ("path", "split", "labels", "class", "issue", "probability", "score")   # a multi-label audit's
SUMMARY_KEYS = ("cache", "data_root", "images", "splits", "classes", "label_issues", "duplicate_groups",
                "leak_groups", "outliers", "settings")

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; } td, th { padding: 3px 8px; text-align: left; vertical-align: middle; }
tr:nth-child(even) { background: #f5f5f5; } th { background: #e8e8e8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.path { word-break: break-all; }
.thumb { width: 96px; height: 96px; display: flex; align-items: center; justify-content: center; }
.thumb img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; }
.missing { background: #eee; color: #777; font-size: 11px; text-align: center; overflow: hidden; }
.note { background: #fff4d6; border: 1px solid #e6c96b; padding: 6px 10px; }
.leak { color: #b00; font-weight: bold; }
.members { display: flex; flex-wrap: wrap; gap: 8px; }
.members figure { margin: 0; width: 120px; font-size: 12px; word-break: break-all; }
"""


def write_page(out_dir: Path) -> Path:
    """Write out_dir/index.html (and out_dir/thumbs/) from the audit's files in out_dir; return its path."""
    out_dir = Path(out_dir)
    summary_path = out_dir / "summary.json"
    summary = read_json(summary_path, Field(dict))
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    if missing:
        raise InputError(f"{summary_path} lacks {', '.join(missing)}")
    multi_label = bool(summary.get("multi_label"))
    columns = {**COLUMNS, **({"label_issues.csv": TAG_ISSUE_COLUMNS} if multi_label else {})}
    tables = {name: _read_csv(out_dir / name, wanted) for name, wanted in columns.items()}
    thumbs = Thumbnails(summary["data_root"], out_dir / "thumbs")
    issues = _tag_issues if multi_label else _label_issues
    body = [_header(summary, thumbs),
            issues(tables["label_issues.csv"], thumbs, summary.get("label_issue_classifier")),
            _duplicates(tables["duplicates.csv"], thumbs, summary),
            _outliers(tables["outliers.csv"], thumbs),
            _learning_curve(tables["learning_curve.csv"], (out_dir / "learning_curve.png").is_file(),
                            summary.get("learning_curve_score", "accuracy"))]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Data audit</title>\n'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    index = out_dir / "index.html"
    write_atomically(index, page)
    return index


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict] | None:
    """The rows of one of the audit's CSVs; None when the file is not there."""
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:   # names as the cache keeps them
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise InputError(f"{path} lacks the column(s) {', '.join(missing)}")
        return list(reader)


# Folders of the system, not of a user's images: a cache naming one (or a folder under the first few) as its
# data folder gets no thumbnails, so a doctored cache cannot copy images from anywhere on the machine.
SYSTEM_FOLDERS = tuple(map(Path, ("/etc", "/proc", "/sys", "/dev", "/boot", "/root", "/run")))
SYSTEM_ROOTS = tuple(map(Path, ("/", "/bin", "/sbin", "/lib", "/lib64", "/usr", "/var", "/opt", "/srv", "/home",
                                "/tmp", "/mnt", "/media")))


class Thumbnails:
    """Small JPEGs of the images under the data root, made once per path, named by a digest of the path
    (never by the user's file name). Only files under a data root that is not a system folder are shown,
    and never through a link that leads out of it."""

    def __init__(self, data_root: str | None, folder: Path):
        self.root = Path(data_root).resolve() if data_root else None
        self.reachable = self.root is not None and self.root.is_dir() and not system_folder(self.root)
        self.folder = folder
        self.made: dict[str, str] = {}   # path -> cell HTML

    def cell(self, rel: str) -> str:
        """A thumbnail linked to the original image, or a grey box with the reason it cannot be shown."""
        if rel not in self.made:
            self.made[rel] = self._make(rel)
        return self.made[rel]

    def _make(self, rel: str) -> str:
        if not self.reachable:
            return _placeholder("images not reachable")
        try:
            source = file_under(self.root, rel).resolve()
            if not source.is_relative_to(self.root):
                raise ImageError("a link out of the data folder")
            image, _ = read_image(source, shortest=THUMB_SIZE)
        except (ImageError, OSError) as exc:
            return _placeholder(str(exc))
        image.thumbnail((THUMB_SIZE, THUMB_SIZE))
        if self.folder.is_symlink():
            raise InputError(f"{self.folder} is a symbolic link; refusing to write thumbnails through it")
        self.folder.mkdir(exist_ok=True)
        name = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:24] + ".jpg"
        jpeg = io.BytesIO()
        image.save(jpeg, "JPEG", quality=85)
        write_atomically(self.folder / name, jpeg.getvalue())
        return (f'<a class="thumb" href="{escape(source.as_uri())}">'
                f'<img src="thumbs/{name}" alt="{escape(rel)}"></a>')


def system_folder(root: Path) -> bool:
    """Whether `root` (resolved) is a folder of the system rather than one of images."""
    return root in SYSTEM_ROOTS or any(root.is_relative_to(folder) for folder in SYSTEM_FOLDERS)


def _placeholder(reason: str) -> str:
    return f'<div class="thumb missing" title="{escape(reason)}">no image<br>{escape(reason[:60])}</div>'


def _header(summary: dict, thumbs: Thumbnails) -> str:
    judged = (summary.get("label_issue_classifier") or {}).get("judged")
    multi_label = bool(summary.get("multi_label"))
    if multi_label:
        issues = "possible tag errors" if judged else "tags the classifier doubts"
        found = (f"{summary['label_issues']:,}: {summary.get('missing_tags', 0):,} missing, "
                 f"{summary.get('wrong_tags', 0):,} wrong")
    else:
        issues = "possible label errors" if judged else "images the classifier doubts"
        found = f"{summary['label_issues']:,}"
    score = escape(str(summary.get("learning_curve_score", "accuracy")))
    splits = ", ".join(f"{escape(str(s))} {n:,}" for s, n in summary["splits"].items())
    counts = [("images", f"{summary['images']:,} ({splits})"),
              ("classes", f"{len(summary['classes'])}: " + ", ".join(escape(str(c)) for c in summary["classes"])),
              (f'<a href="#label_issues">{issues}</a>', found),
              ('<a href="#duplicates">near-duplicate groups</a>',
               f"{summary['duplicate_groups']:,}, {summary['leak_groups']:,} of them across splits"),
              ('<a href="#outliers">outliers</a>', f"{summary['outliers']:,}"),
              ('<a href="#learning_curve">learning curve</a>', f"{score} against labelled images per class"),
              ("feature cache", escape(str(summary["cache"]))),
              ("data folder", escape(str(summary["data_root"])))]
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in counts)
    settings = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(json.dumps(v))}</td></tr>"
                       for k, v in summary["settings"].items())
    root = summary["data_root"]
    where = ("the cache names no data folder" if not root else
             f"{escape(str(root))} is a system folder, not one of images" if thumbs.root and system_folder(thumbs.root)
             else f"{escape(str(root))} is not a folder on this machine")
    note = "" if thumbs.reachable else \
        f'<p class="note">The images are not reachable: {where}. The tables list their paths without thumbnails.</p>'
    kind = ('<p class="note">A multi-label audit: each image may carry several labels (shown as a|b); label issues '
            "are per image and class, a tag likely missing or likely wrong.</p>\n" if multi_label else "")
    return (f"<h1>Data audit{' (multi-label)' if multi_label else ''}</h1>\n{kind}{note}<table>{rows}</table>\n"
            f"<details><summary>Settings</summary><table>{settings}</table></details>\n"
            f"<p>Each table shows its first {ROWS_SHOWN:,} rows; the linked CSV files hold all of them. "
            f"Click a thumbnail for the original image.</p>")


def _section(title: str, file: str, rows: list | None, what: str, explain: str, shown: int | None = None) -> str:
    """The heading and explanation of a table, and how many of its rows are shown (the first ROWS_SHOWN
    unless `shown` says)."""
    head = f'<h2 id="{file.split(".")[0]}">{title}</h2>\n<p>{explain}</p>\n'
    if rows is None:
        return head + f'<p class="note">{file} is not in this folder.</p>'
    shown = min(len(rows), ROWS_SHOWN) if shown is None else shown
    return head + f'<p>{shown:,} of {len(rows):,} {what} shown; all in <a href="{file}">{file}</a>.</p>\n'


def _table(header: tuple[str, ...], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>\n"
            + "\n".join("<tr>" + "".join(cells) + "</tr>" for cells in rows) + "</table>")


def _text(value: str, cls: str = "") -> str:
    return f'<td class="{cls}">{escape(value)}</td>' if cls else f"<td>{escape(value)}</td>"


def _number(value: str) -> str:
    try:
        return f'<td class="num">{float(value):.3f}</td>'
    except ValueError:
        return _text(value, "num")


def _label_issues(rows: list[dict] | None, thumbs: Thumbnails, classifier: dict | None) -> str:
    judged = bool(classifier and classifier["judged"])
    title = "Possible label errors" if judged else "Images the classifier doubts"
    out = _section(title, "label_issues.csv", rows, "images",
                   "Images whose given label the out-of-fold predictions doubt, most doubtful first. "
                   "Score: 1 minus the predicted probability of the given label.")
    out += f'<p class="note">{_label_trust(classifier)}</p>\n'
    if not rows:
        return out
    return out + _table(("image", "path", "split", "given", "suggested", "score"), [
        [f"<td>{thumbs.cell(r['path'])}</td>", _text(r["path"], "path"), _text(r["split"]), _text(r["given"]),
         _text(r["suggested"]), _number(r["score"])] for r in rows[:ROWS_SHOWN]])


def _label_trust(classifier: dict | None) -> str:
    """How far the list can be taken for label errors, from the figures of the classifier behind it."""
    if not classifier:
        return "This report does not record how good the classifier behind this list is: judge each image yourself."
    figures = (f"The classifier behind this list, tried on images it did not see, agrees with "
               f"{classifier['out_of_fold_accuracy']:.1%} of the given labels and with "
               f"{classifier['accuracy_on_unlisted']:.1%} of those it does not list, with a calibration error of "
               f"{classifier['calibration_error']:.3f}. ")
    if classifier["judged"]:
        return figures + ("On benchmarks with 5% of the labels flipped, a classifier this good listed mostly "
                          "wrong labels, the likeliest first; check each before relabelling.")
    return figures + (f"That is too weak to judge labels (it takes at least {classifier['minimum_accuracy']:.0%} "
                      f"on the unlisted images and a calibration error of at most "
                      f"{classifier['maximum_calibration_error']}): these are images the classifier finds hard, "
                      "not label errors. Fix the features first (a larger image size, another backbone).")


def _tag_issues(rows: list[dict] | None, thumbs: Thumbnails, classifier: dict | None) -> str:
    judged = bool(classifier and classifier["judged"])
    title = "Possible tag errors" if judged else "Tags the classifier doubts"
    out = _section(title, "label_issues.csv", rows, "image and class pairs",
                   "Each row is one image and one class, most doubtful first: a missing tag (the class is not in "
                   "the image's labels, yet the out-of-fold one-vs-rest probability of it is high) or a wrong tag "
                   "(in its labels, yet that probability is low). Score: 1 minus the probability of what the "
                   "labels say (the probability for a missing tag, 1 minus it for a wrong one).")
    out += f'<p class="note">{_tag_trust(classifier)}</p>\n'
    if not rows:
        return out
    return out + _table(("image", "path", "split", "labels", "class", "issue", "probability", "score"), [
        [f"<td>{thumbs.cell(r['path'])}</td>", _text(r["path"], "path"), _text(r["split"]), _text(r["labels"]),
         _text(r["class"]), _text(f"{r['issue']} tag"), _number(r["probability"]), _number(r["score"])]
        for r in rows[:ROWS_SHOWN]])


def _tag_trust(classifier: dict | None) -> str:
    """How far the list can be taken for tag errors, from the figures of the classifier behind it."""
    if not classifier:
        return "This report does not record how good the classifier behind this list is: judge each tag yourself."
    figures = (f"The one-vs-rest classifier behind this list, tried on images it did not see, reaches a macro AP of "
               f"{classifier['out_of_fold_macro_ap']:.3f} against the given labels and of "
               f"{classifier['macro_ap_on_unlisted']:.3f} over the tags it does not list, with a calibration error "
               f"of {classifier['calibration_error']:.3f}. ")
    if classifier["judged"]:
        return figures + "The likeliest errors come first; check each before retagging."
    return figures + (f"That is too weak to judge tags (it takes a macro AP of at least "
                      f"{classifier['minimum_macro_ap']} on the unlisted tags and a calibration error of at most "
                      f"{classifier['maximum_calibration_error']}): these are tags the classifier finds hard, not "
                      "tag errors. Fix the features first (a larger image size, another backbone).")


def _duplicates(rows: list[dict] | None, thumbs: Thumbnails, summary: dict) -> str:
    groups: dict[str, list[dict]] = {}
    for r in rows or []:
        groups.setdefault(r["group"], []).append(r)
    shown = None if rows is None else list(groups)
    settings, check = summary["settings"], summary.get("pixel_check") or {}
    pixels = (f"and pairs from a similarity of {escape(str(settings.get('pixel_check_from')))} whose pixels "
              f"correlate at least {escape(str(settings.get('pixel_match')))} once aligned (a crop of up to 12% "
              "from any side, a rescale or a mirror undone): 'pixels' marks an image joined only that way"
              if not check.get("skipped") else f"(pixels not compared: {escape(str(check['skipped']))})")
    out = _section("Near-duplicates and split leaks", "duplicates.csv", shown, "groups",
                   "Groups of nearly identical images, groups that span two splits (leaks) first. Found from "
                   f"a cosine similarity of the standardised vectors of "
                   f"{escape(str(settings.get('duplicate_threshold')))}, "
                   f"{pixels}. Under each image: its split, its highest similarity and pixel correlation to "
                   f"another of its group. Up to {MEMBERS_SHOWN} images per group are shown.")
    out += ('<p class="note">How far to trust it: with these settings, on photos with planted copies (re-encoded, '
            "resized, cropped from a corner or a side, mirrored, colour-shifted) among look-alike images "
            "(trousers, handwritten digits, quadrants of one photo), most copies are found and few pairs join "
            "distinct images (benchmarks/RESULTS.md). Very simple images (strokes, silhouettes) can still join "
            "look-alikes: look at the thumbnails before deleting.</p>\n")
    if not groups:
        return out
    ordered = sorted(groups.values(), key=lambda g: g[0]["leak"].strip().lower() != "true")
    table = []
    for members in ordered[:ROWS_SHOWN]:
        leak = members[0]["leak"].strip().lower() == "true"
        figures = "".join(f"<figure>{thumbs.cell(m['path'])}<figcaption>{escape(m['path'])}<br>"
                          f"{escape(m['split'])} · {escape(m['similarity'])}"
                          f"{' · ' + escape(m['pixel_correlation']) if m['pixel_correlation'] else ''}"
                          f"{' · pixels' if m['found_by'] == 'pixels' else ''}</figcaption></figure>"
                          for m in members[:MEMBERS_SHOWN])
        more = f"<p>and {len(members) - MEMBERS_SHOWN:,} more</p>" if len(members) > MEMBERS_SHOWN else ""
        table.append([_text(members[0]["group"], "num"),
                      '<td class="leak">leak</td>' if leak else "<td></td>",
                      f'<td><div class="members">{figures}</div>{more}</td>'])
    return out + _table(("group", "", "images: path, split, similarity, pixel correlation"), table)


def _outliers(rows: list[dict] | None, thumbs: Thumbnails) -> str:
    flagged = sum(r["flagged"].strip().lower() == "true" for r in rows or [])
    shown = (rows or [])[:min(flagged, ROWS_SHOWN)] + (rows or [])[flagged:flagged + OUTLIERS_BELOW]
    out = _section("Outliers", "outliers.csv", rows, "images",
                    "Every image ranked, most unusual first: the flagged ones (score from --outlier-cut) and the "
                    f"next {OUTLIERS_BELOW}. Distances (cosine): the mean to the k nearest neighbours within the "
                    "image's class and among all images, and to the nearest class centre; score: the three over "
                    "the median image's, averaged (1 is typical).", len(shown))
    out += (f'<p class="note">How far to trust it: {flagged:,} images flagged. Images that show no object of any '
            "class (flat frames, noise, gradients, text, placeholders, blank scans) rank at the top on the "
            "benchmarks; further down, a high score means rare, not wrong: rare poses and backgrounds are "
            "worth keeping.</p>\n")
    if not rows:
        return out
    return out + _table(("image", "path", "split", "label", "score", "flagged", "distance in class",
                         "distance overall", "distance to classes"), [
        [f"<td>{thumbs.cell(r['path'])}</td>", _text(r["path"], "path"), _text(r["split"]), _text(r["label"]),
         _number(r["score"]), _text("yes" if r["flagged"].strip().lower() == "true" else ""),
         _number(r["score_in_class"]), _number(r["score_overall"]), _number(r["distance_to_classes"])]
        for r in shown])


def _learning_curve(rows: list[dict] | None, has_plot: bool, score: str) -> str:
    score = escape(score)
    out = _section("How many labels are enough", "learning_curve.csv", rows, "rows",
                   f"{score[0].upper() + score[1:]} on the evaluation split against the number of training images "
                   "per class, mean and standard deviation over several runs.")
    if has_plot:
        out += '<p><img src="learning_curve.png" alt="learning curve" style="max-width: 100%"></p>\n'
    if not rows:
        return out
    return out + _table(("head", "images per class", f"mean {score}", "std", "runs"), [
        [_text(r["head"]), _text(r["per_class"], "num"), _number(r["mean"]), _number(r["std"]),
         _text(r["runs"], "num")] for r in rows[:ROWS_SHOWN]])
