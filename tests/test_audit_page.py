"""The audit page: built from an audit folder as `pipeline audit` writes it, escaped, limited, opened offline
by a real browser."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from pipeline.report.audit_page import COLUMNS, OUTLIERS_BELOW, ROWS_SHOWN, write_page
from pipeline.runtime.errors import InputError
from tests.browser import Elements, dump_dom, needs_chromium
from tests.conftest import make_image_folder

HOSTILE = "<img src=x onerror=alert(1)>.png"        # a legal file name on Linux
HOSTILE_LABEL = '"><script>alert(2)</script>'


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS[path.name])
        writer.writeheader()
        writer.writerows(rows)


def audit_folder(tmp_path: Path, data_root: Path | None, label_rows: int = 3, judged: bool = True,
                 ranked: int = 0) -> Path:
    """An audit folder per the file contract, about the images of make_image_folder plus a hostile name and
    an undecodable file; `judged`: whether the classifier behind the label issues is good enough to call them
    errors; `ranked`: unflagged images after the two flagged outliers."""
    out = tmp_path / "audit"
    out.mkdir()
    images = [f"train/{c}/train_{i}.png" for c in ("red", "green") for i in range(2)]
    write_csv(out / "label_issues.csv",
              [{"path": images[i % len(images)], "split": "train", "given": "red", "suggested": HOSTILE_LABEL,
                "score": 0.9 - i / (2 * label_rows)} for i in range(label_rows)]
              + [{"path": "train/red/broken.png", "split": "train", "given": "red", "suggested": "blue",
                  "score": 0.1}])
    write_csv(out / "duplicates.csv", [
        {"group": 0, "path": images[0], "split": "train", "similarity": 1.0, "pixel_correlation": "",
         "leak": "true", "found_by": "features"},
        {"group": 0, "path": f"val/red/{HOSTILE}", "split": "val", "similarity": 0.97, "pixel_correlation": "",
         "leak": "true", "found_by": "features"},
        {"group": 1, "path": images[1], "split": "train", "similarity": 0.82, "pixel_correlation": 0.991,
         "leak": "false", "found_by": "pixels"},
        {"group": 1, "path": images[2], "split": "train", "similarity": 0.82, "pixel_correlation": 0.991,
         "leak": "false", "found_by": "pixels"}])
    write_csv(out / "outliers.csv", [{"path": images[3], "split": "test", "label": "green", "score": 2.8,
                                      "flagged": "true", "score_in_class": 0.7, "score_overall": 0.6,
                                      "distance_to_classes": 0.5},
                                     {"path": "../outside.png", "split": "test", "label": "green", "score": 2.5,
                                      "flagged": "true", "score_in_class": 0.4, "score_overall": 0.3,
                                      "distance_to_classes": 0.5}]
              + [{"path": f"unflagged_{i}.png", "split": "train", "label": "red", "score": 1.5 - i / ranked,
                  "flagged": "false", "score_in_class": 0.2, "score_overall": 0.2, "distance_to_classes": 0.2}
                 for i in range(ranked)])
    write_csv(out / "learning_curve.csv", [{"head": "logreg", "per_class": n, "mean": 0.5 + n / 20, "std": 0.01,
                                            "runs": 3} for n in (1, 2, 5, 8)])
    Image.new("RGB", (320, 200), (200, 220, 255)).save(out / "learning_curve.png")
    (out / "summary.json").write_text(json.dumps({
        "cache": "features.h5", "data_root": str(data_root) if data_root else "/nowhere/images",
        "images": len(images), "splits": {"train": 24, "val": 12}, "classes": ["red", "green", HOSTILE_LABEL],
        "label_issues": label_rows + 1, "duplicate_groups": 2, "leak_groups": 1, "outliers": 2,
        "label_issue_classifier": {"out_of_fold_accuracy": 0.97 if judged else 0.8,
                                   "accuracy_on_unlisted": 0.98 if judged else 0.85, "calibration_error": 0.03,
                                   "judged": judged, "minimum_accuracy": 0.9, "maximum_calibration_error": 0.15},
        "settings": {"folds": 5, "duplicate_threshold": 0.88, "pixel_check_from": 0.6, "pixel_match": 0.98},
        "pixel_check": {"skipped": None}}))
    return out


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = make_image_folder(tmp_path / "images", per_split={"train": 2, "val": 1})
    Image.new("RGB", (40, 30), (250, 0, 250)).save(root / "val" / "red" / HOSTILE, "PNG")
    (root / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_page_escapes_user_data_and_loads_nothing_from_the_network(tmp_path, data_root):
    index = write_page(audit_folder(tmp_path, data_root))
    page = index.read_text(encoding="utf-8")
    elements = Elements(page)
    assert not elements.all("script") and "onerror" not in {k for _, a in elements.tags for k in a}
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in page and HOSTILE not in page and HOSTILE_LABEL not in page
    links = [a.get("src") or a.get("href") for _, a in elements.tags if a.get("src") or a.get("href")]
    assert links and not [u for u in links if re.match(r"\w+://", u) and not u.startswith("file://")]
    thumbs = [a["src"] for a in elements.all("img") if a["src"].startswith("thumbs/")]
    assert len(thumbs) == 8 and len(set(thumbs)) == 5    # four images and the hostile name; broken.png has none
    assert sorted(p.name for p in (index.parent / "thumbs").iterdir()) == sorted({Path(t).name for t in thumbs})
    for t in thumbs:
        with Image.open(index.parent / t) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= 96
    assert "cannot decode" in page or "not a recognised image" in page     # broken.png: a placeholder
    assert "path outside the data folder" in page                          # ../outside.png is not read
    assert page.count("0.82 · 0.991 · pixels") == 2 and "0.97 · pixels" not in page  # what joined each group
    hrefs = {a["href"] for a in elements.all("a")}
    assert set(COLUMNS) <= hrefs and (data_root / "val" / "red" / HOSTILE).as_uri() in hrefs


def test_unreachable_images_are_named_and_the_page_still_lists_the_rows(tmp_path):
    index = write_page(audit_folder(tmp_path, None))
    page = index.read_text(encoding="utf-8")
    assert "The images are not reachable" in page and "/nowhere/images" in page
    assert not [a for a in Elements(page).all("img") if a["src"].startswith("thumbs/")]
    assert "train/red/train_0.png" in page


def test_thousands_of_rows_show_the_first_ones_and_link_the_csv(tmp_path):
    index = write_page(audit_folder(tmp_path, None, label_rows=3000))
    page = index.read_text(encoding="utf-8")
    section = page.split('id="label_issues"')[1].split("<h2")[0]
    assert section.count("<tr>") == ROWS_SHOWN + 1                 # header + the first rows
    assert f"{ROWS_SHOWN:,} of 3,001 images shown" in section and 'href="label_issues.csv"' in section
    scores = [float(s) for s in re.findall(r'<td class="num">([\d.]+)</td>', section)]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(0.9)


def test_each_section_says_how_far_to_trust_it(tmp_path):
    """A weak classifier's list is not called label errors; the outliers shown are the flagged ones and the
    next OUTLIERS_BELOW of the ranking."""
    page = write_page(audit_folder(tmp_path, None, judged=False, ranked=50)).read_text(encoding="utf-8")
    labels = page.split('id="label_issues"')[1].split("<h2")[0]
    assert "Images the classifier doubts" in page and "Possible label errors" not in page
    assert "80.0% of the given labels" in labels and "too weak to judge labels" in labels
    outliers = page.split('id="outliers"')[1].split("<h2")[0]
    assert f"{2 + OUTLIERS_BELOW} of {2 + 50} images shown" in outliers and "2 images flagged" in outliers
    assert f"unflagged_{OUTLIERS_BELOW - 1}.png" in outliers and f"unflagged_{OUTLIERS_BELOW}.png" not in outliers
    duplicates = page.split('id="duplicates"')[1].split("<h2")[0]
    assert "How far to trust it" in duplicates and "0.98 once aligned" in duplicates

    (tmp_path / "judged").mkdir()
    page = write_page(audit_folder(tmp_path / "judged", None)).read_text(encoding="utf-8")
    assert "Possible label errors" in page and "97.0% of the given labels" in page
    assert "too weak" not in page


def test_files_without_the_contract_fields_are_refused(tmp_path):
    out = audit_folder(tmp_path, None)
    (out / "outliers.csv").write_text("path,score\na.png,0.5\n")
    with pytest.raises(InputError, match="outliers.csv lacks the column.*split"):
        write_page(out)
    summary = json.loads((out / "summary.json").read_text())
    del summary["classes"]
    (out / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match="summary.json lacks classes"):
        write_page(out)
    assert not (out / "index.html").exists()


PROBE = """<script>addEventListener("load", () => {
  for (const img of document.images) img.dataset.naturalWidth = img.naturalWidth;
  document.body.dataset.probed = document.images.length;
});</script>"""


@needs_chromium
def test_a_real_browser_renders_the_thumbnails_offline(tmp_path, data_root):
    """Headless chromium opens a copy of the page with a probe script that records each image's decoded
    width: every thumbnail and the plot must have decoded from disk."""
    index = write_page(audit_folder(tmp_path, data_root))
    probe = index.with_name("probe.html")
    probe.write_text(index.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = dump_dom(probe, tmp_path / "profile")
    elements = Elements(dom)
    body, = elements.all("body")
    images = elements.all("img")
    assert body.get("data-probed") == str(len(images)) == "9"      # eight thumbnails and the learning curve
    assert all(int(img["data-natural-width"]) > 0 for img in images), images
