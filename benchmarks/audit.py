"""The measured targets of `pipeline audit`, one part at a time:

    python benchmarks/audit.py flips CACHE          # 5% of the training labels flipped (seeded): found in the
                                                    # top 2 x flipped rows, ours against cleanlab's
                                                    # find_label_issues on the same probabilities
    python benchmarks/audit.py duplicates FOLDER    # photos with planted near-copies in other splits:
                                                    # leaks found and distinct pairs reported, per threshold
    python benchmarks/audit.py scale                # 100,000 x 1,280 vectors: time and peak memory of the
                                                    # neighbour search and of 5-fold label issues

`flips` needs cleanlab (pip install cleanlab; AGPL-3.0, for this comparison only, not a dependency).
Flipping labels in a copy of the cache is flipping them in a copy of the image folder: vectors do not
depend on labels. `duplicates` extracts FOLDER's photos with EfficientNet-Lite0 at 224 px (the bundled
ImageNet weights) after writing the copies. `scale` uses a fixed random ReLU projection of the 70,000
Fashion-MNIST images (28x28 -> 1,280, real class structure) and their 30,000 first mirror images.
Each part prints one JSON line and the machine's load average.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stage_two import FASHION, read_idx  # noqa: E402
from pipeline.auditing import label_issues, neighbours, pixels  # noqa: E402
from pipeline.auditing.run import read_images  # noqa: E402
from pipeline.auditing.settings import AuditSettings  # noqa: E402
from pipeline.storage.cache import open_cache  # noqa: E402

THRESHOLDS = (0.70, 0.75, 0.80, 0.82, 0.84, 0.85, 0.86, 0.88, 0.90, 0.92)
PIXEL_CHECK_FROM, PIXEL_MATCH = AuditSettings.pixel_check_from, AuditSettings.pixel_match


def machine() -> dict:
    return {"cores": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()]}


def flips(cache_path: Path, fraction: float = 0.05, folds: int = 5, seed: int = 0) -> dict:
    from cleanlab.filter import find_label_issues as cleanlab_issues
    with open_cache(cache_path) as cache:
        images = read_images(cache)
        n_classes = len(cache.classes)
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(images.splits == "train")
    flipped = rng.choice(train, round(fraction * len(train)), replace=False)
    noisy = images.labels.copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, n_classes, len(flipped))) % n_classes
    start = time.perf_counter()
    probabilities = label_issues.out_of_fold_probabilities(images.features, noisy, n_classes, folds, seed=seed)
    oof_seconds = time.perf_counter() - start
    ours = label_issues.find_label_issues(probabilities, noisy).rows
    theirs = cleanlab_issues(noisy, probabilities, return_indices_ranked_by="self_confidence")
    rows = 2 * len(flipped)
    return {"part": "flips", "images": len(noisy), "flipped": len(flipped), "rows_checked": rows,
            "found_ours": int(np.isin(flipped, ours[:rows]).sum()),
            "found_cleanlab": int(np.isin(flipped, theirs[:rows]).sum()),
            "flagged_ours": len(ours), "flagged_cleanlab": len(theirs),
            "same_flagged_images": len(np.intersect1d(ours, theirs)),
            "out_of_fold_accuracy_on_true_labels": round(float(np.mean(probabilities.argmax(1) == images.labels)), 4),
            "out_of_fold_seconds": round(oof_seconds, 1), **machine()}


TRANSFORMS = {
    "jpeg_q50": lambda im: Image.open(_jpeg(im, 50)).convert("RGB"),
    "resized_80": lambda im: im.resize((round(im.width * 0.8), round(im.height * 0.8)), Image.LANCZOS),
    "cropped_5": lambda im: im.crop((round(im.width * 0.025), round(im.height * 0.025),
                                     round(im.width * 0.975), round(im.height * 0.975))),
    "flipped": ImageOps.mirror,
    "colour_shifted": lambda im: ImageEnhance.Brightness(ImageEnhance.Color(im).enhance(1.15)).enhance(1.08),
}


def _jpeg(im: Image.Image, quality: int) -> io.BytesIO:
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return buffer


def photo_sources(folder: Path | None) -> list[tuple[str, Image.Image]]:
    """The bundled photos of scikit-image, scikit-learn and matplotlib, and FOLDER's (recursively),
    each also cut into four quadrants: distinct images of the same scene, the hardest non-duplicates."""
    import matplotlib
    import skimage
    import sklearn
    files = [Path(skimage.__file__).parent / "data" / name for name in
             ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
              "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")]
    files += sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    files.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    if folder:
        files += sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    out = []
    for path in files:
        im = Image.open(path).convert("RGB")
        im.thumbnail((1024, 1024))
        out.append((path.stem, im))
        w, h = im.size
        for i, box in enumerate(((0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h),
                                 (w // 2, h // 2, w, h))):
            out.append((f"{path.stem}_q{i}", im.crop(box)))
    return out


def duplicates(folder: Path | None, k: int = 10) -> dict:
    from pipeline.features.extract import extract_folder
    from pipeline.features.settings import ExtractSettings
    sources = photo_sources(folder)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        for i, (name, im) in enumerate(sources):
            label = "a" if i % 2 == 0 else "b"
            (root / "train" / label).mkdir(parents=True, exist_ok=True)
            im.save(root / "train" / label / f"{name}.png")
            for j, (kind, transform) in enumerate(TRANSFORMS.items()):
                split = ("val", "test")[(i + j) % 2]
                (root / split / label).mkdir(parents=True, exist_ok=True)
                transform(im).save(root / split / label / f"{name}@{kind}.png")
        start = time.perf_counter()
        extract_folder(root, Path(tmp) / "features.h5", ExtractSettings(image_size=224), quiet=True)
        extract_seconds = time.perf_counter() - start
        with open_cache(Path(tmp) / "features.h5") as cache:
            images = read_images(cache)
        source = np.array([Path(p).stem.split("@")[0] for p in images.paths])
        kind = np.array([Path(p).stem.split("@")[1] if "@" in p else "original" for p in images.paths])
        copies = np.flatnonzero(kind != "original")
        sims, idx = neighbours.knn(neighbours.search_space(images.features), k)
        per_threshold = []
        for threshold, pixel_from in [(t, 1.0) for t in THRESHOLDS] + [(t, PIXEL_CHECK_FROM) for t in THRESHOLDS]:
            pairs = neighbours.neighbour_pairs(sims, idx, min(threshold, pixel_from))
            start = time.perf_counter()
            pairs, counts = pixels.confirm(pairs, threshold, PIXEL_MATCH, pixels.PixelCheck(str(root), images.paths))
            found = neighbours.duplicate_groups(pairs, images.splits)
            leaking = set(found.rows[found.leak])
            distinct = int(np.sum(source[pairs.a] != source[pairs.b]))
            per_threshold.append({
                "threshold": threshold, "pixel_check_from": pixel_from,
                "copies_found_as_leaks": round(float(np.mean([c in leaking for c in copies])), 4),
                **{f"leaks_{t}": round(float(np.mean([c in leaking for c in copies[kind[copies] == t]])), 4)
                   for t in TRANSFORMS},
                "pairs": len(pairs.a), "by_pixels": int(pairs.by_pixels.sum()), "distinct_pairs": distinct,
                "distinct_share": round(distinct / max(1, len(pairs.a)), 4), "pixels_compared": counts["checked"],
                "pixel_seconds": round(time.perf_counter() - start, 2)})
    return {"part": "duplicates", "originals": len(sources), "copies": len(sources) * len(TRANSFORMS),
            "extract_seconds": round(extract_seconds, 1), "per_threshold": per_threshold, **machine()}


def scale_vectors(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    projection = rng.normal(0, 1 / 28, (784, 1280)).astype(np.float32)
    images = np.concatenate([read_idx(FASHION / f"{n}-images-idx3-ubyte.gz") for n in ("train", "t10k")])
    labels = np.concatenate([read_idx(FASHION / f"{n}-labels-idx1-ubyte.gz") for n in ("train", "t10k")])
    images = np.concatenate([images, images[:30000, :, ::-1]]).reshape(-1, 784).astype(np.float32) / 255
    labels = np.concatenate([labels, labels[:30000]]).astype(np.int64)
    X = np.concatenate([np.maximum(images[s:s + 10000] @ projection, 0) for s in range(0, len(images), 10000)])
    return label_issues.l2_normalised(X).astype(np.float16).astype(np.float32), labels   # as cached: float16


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale(k: int = 10, folds: int = 5, threshold: float = 0.85) -> dict:
    import torch
    torch.set_num_threads(2)
    X, y = scale_vectors()
    before = peak_mb()
    start = time.perf_counter()
    splits = np.array(["train", "val"], dtype=object)[np.arange(len(y)) % 2]
    groups = neighbours.duplicate_groups(neighbours.neighbour_pairs(*neighbours.knn(neighbours.search_space(X), k),
                                                                    threshold), splits)
    sims, _ = neighbours.knn(X, k)
    class_sims, _ = neighbours.knn_within(X, y, k)
    neighbours.isolation(sims), neighbours.isolation(class_sims)
    neighbour_seconds = time.perf_counter() - start
    neighbour_peak = peak_mb()
    start = time.perf_counter()
    probabilities = label_issues.out_of_fold_probabilities(X, y, 10, folds)
    issues = label_issues.find_label_issues(probabilities, y)
    issue_seconds = time.perf_counter() - start
    return {"part": "scale", "vectors": list(X.shape), "vectors_mb": round(X.nbytes / 2**20),
            "duplicates_and_outliers_seconds": round(neighbour_seconds, 1),
            "peak_rss_mb_before": round(before), "peak_rss_mb_after_neighbours": round(neighbour_peak),
            "duplicate_groups": len(set(groups.group)), "label_issues_seconds": round(issue_seconds, 1),
            "label_issues": len(issues.rows), "folds": folds, "peak_rss_mb_end": round(peak_mb()), **machine()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("flips", "duplicates", "scale"))
    p.add_argument("path", nargs="?", type=Path, help="flips: the feature cache; duplicates: a folder of more photos")
    args = p.parse_args()
    if args.part == "flips" and args.path is None:
        p.error("flips needs the feature cache, e.g. features/lite0_160.h5")
    parts = {"flips": lambda: flips(args.path), "duplicates": lambda: duplicates(args.path), "scale": scale}
    result = parts[args.part]()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
