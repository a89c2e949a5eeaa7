"""The audit's tag issues on generated mosaics (benchmarks/multilabel.py's set) with planted tag errors:

    python benchmarks/audit_multilabel.py [--images 1200] [--image-size 160] [--planted 0.05] [--work DIR]

A fraction `--planted` of the images gets one tag error in its labels file, half a missing tag (one of its tags
dropped) and half a wrong one (a class it does not show added); the cache is extracted again with those labels
(every vector reused) and audited with the default settings. Prints one JSON line: how many cells were flagged,
the precision and recall of the list, the precision of its first rows (as many as were planted), the median rank
of the planted cells found, the out-of-fold macro AP and the audit's run time.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.multilabel import mosaic_cache  # noqa: E402
from pipeline import api  # noqa: E402
from pipeline.auditing.run import audit  # noqa: E402
from pipeline.auditing.settings import AuditSettings  # noqa: E402


def plant(labels: Path, out: Path, fraction: float, seed: int = 0) -> set[tuple[str, str, str]]:
    """Write `labels` to `out` with a tag error in `fraction` of its images; returns (path, class, issue) of each."""
    rng = np.random.default_rng(seed)
    rows = [line.split(",", 1) for line in labels.read_text().splitlines()[1:]]
    classes = sorted({t for _, tags in rows for t in tags.split("|") if t})
    planted = set()
    for n, row in enumerate(rng.choice(len(rows), int(round(fraction * len(rows))), replace=False)):
        tags = [t for t in rows[row][1].split("|") if t]
        if n % 2 == 0:
            tag = str(rng.choice(tags))
            tags.remove(tag)
            planted.add((f"{rows[row][0]}.png", tag, "missing"))
        else:
            tag = str(rng.choice([c for c in classes if c not in tags]))
            tags.append(tag)
            planted.add((f"{rows[row][0]}.png", tag, "wrong"))
        rows[row][1] = "|".join(tags)
    out.write_text("id,tags\n" + "".join(f"{i},{t}\n" for i, t in rows))
    return planted


def measure(cache: Path, images: Path, work: Path, fraction: float, image_size: int) -> dict:
    planted = plant(images / "labels.csv", work / "planted.csv", fraction)
    noisy = work / "planted.h5"
    shutil.copy(cache, noisy)
    api.extract(images, noisy, labels=str(work / "planted.csv"), label_column="tags", multi_label=True,
                image_size=image_size, quiet=True)
    start = time.perf_counter()
    summary = audit(noisy, work / "report", AuditSettings())
    seconds = time.perf_counter() - start
    with open(work / "report" / "label_issues.csv", newline="") as f:
        listed = [(r["path"], r["class"], r["issue"]) for r in csv.DictReader(f)]
    hits = [cell in planted for cell in listed]
    ranks = [i + 1 for i, hit in enumerate(hits) if hit]
    return {"images": summary["images"], "classes": len(summary["classes"]), "planted": len(planted),
            "flagged": len(listed), "precision": round(float(np.mean(hits)), 3) if hits else None,
            "recall": round(len(ranks) / len(planted), 3),
            "precision_first_rows": round(float(np.mean(hits[:len(planted)])), 3) if hits else None,
            "median_rank_found": float(np.median(ranks)) if ranks else None,
            "classifier": summary["label_issue_classifier"], "audit_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--planted", type=float, default=0.05)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="audit-multilabel-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = mosaic_cache(work, args.images, args.image_size)
    print(json.dumps(measure(cache, work / f"mosaics-{args.images}", work, args.planted, args.image_size)))


if __name__ == "__main__":
    main()
