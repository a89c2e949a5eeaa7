"""The measured targets of `pipeline audit`, one part at a time:

    python benchmarks/audit.py flips                # the demo and scikit-learn's digits, 5% of all labels
                                                    # flipped (seeded): precision and recall of the flagged
                                                    # images, and what the audit says of its classifier
    python benchmarks/audit.py duplicates [FOLDER]  # photos (and FOLDER's) with planted copies in other splits
                                                    # (re-encoded, resized, cropped from a corner or a side,
                                                    # mirrored, colour-shifted, combinations), among distinct
                                                    # look-alikes (trousers, handwritten 1s, a photo's quadrants):
                                                    # leaks found and distinct pairs reported, per threshold
    python benchmarks/audit.py outliers [FOLDER]    # flat, noise, gradient, text, placeholder and blank-scan
                                                    # images planted into the demo and into the photos: their
                                                    # ranks among the outliers
    python benchmarks/audit.py scale                # 100,000 x 1,280 vectors: time and peak memory of the
                                                    # neighbour search and of 5-fold label issues; the
                                                    # alignment of the most pairs the pixel check compares

Images are extracted with EfficientNet-Lite0 (the bundled ImageNet weights): photos at 224 px, the demo at
160, the digits at 64. `--work DIR` keeps the written images and their caches for the next run. `scale`
uses a fixed random ReLU projection of the 70,000 Fashion-MNIST images (28x28 -> 1,280, real class
structure) and their 30,000 first mirror images. Each part prints one JSON line and the machine's load
average.
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
from pipeline.auditing import outliers as outlier_ranking  # noqa: E402
from pipeline.auditing.run import read_images  # noqa: E402
from pipeline.auditing.settings import AuditSettings  # noqa: E402
from pipeline.storage.cache import open_cache  # noqa: E402

THRESHOLDS = (0.70, 0.75, 0.80, 0.82, 0.84, 0.85, 0.86, 0.88, 0.90, 0.92)
PIXEL_CHECK_FROM, PIXEL_MATCH = AuditSettings.pixel_check_from, AuditSettings.pixel_match


def machine() -> dict:
    return {"cores": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()]}


def _corner_crop(im: Image.Image, share: float, corner: int) -> Image.Image:
    """`im` less `share` of its width and height at one corner (0: top left ... 3: bottom right)."""
    dx, dy = round(im.width * share), round(im.height * share)
    left, top = (dx, 0)[corner % 2], (dy, 0)[corner // 2]
    return im.crop((left, top, im.width - dx + left, im.height - dy + top))


def _side_crop(im: Image.Image, share: float, side: int) -> Image.Image:
    """`im` less `share` of its size on one side (0 left, 1 top, 2 right, 3 bottom)."""
    box = [0, 0, im.width, im.height]
    box[side] += (1 if side < 2 else -1) * round((im.width, im.height)[side % 2] * share)
    return im.crop(tuple(box))


def _scaled(im: Image.Image, scale: float) -> Image.Image:
    return im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


# name -> (image, rng) -> copy; the random parameters are drawn per image, seeded
TRANSFORMS = {
    "jpeg_q50": lambda im, rng: _jpeg(im, 50),
    "resized_80": lambda im, rng: _scaled(im, 0.8),
    "cropped_5": lambda im, rng: im.crop((round(im.width * 0.025), round(im.height * 0.025),
                                          round(im.width * 0.975), round(im.height * 0.975))),
    "flipped": lambda im, rng: ImageOps.mirror(im),
    "colour_shifted": lambda im, rng: ImageEnhance.Brightness(ImageEnhance.Color(im).enhance(1.15)).enhance(1.08),
    "corner_crop": lambda im, rng: _corner_crop(im, rng.uniform(0.03, 0.10), rng.integers(4)),
    "side_crop": lambda im, rng: _side_crop(im, rng.uniform(0.03, 0.10), rng.integers(4)),
    "crop_jpeg": lambda im, rng: _jpeg(_corner_crop(im, rng.uniform(0.03, 0.10), rng.integers(4)),
                                       int(rng.integers(30, 51))),
    "rescale_crop": lambda im, rng: _corner_crop(_scaled(im, rng.uniform(0.5, 0.9)), rng.uniform(0.03, 0.10),
                                                 rng.integers(4)),
}


def alike_sources(per_set: int = 60) -> list[tuple[str, Image.Image]]:
    """Distinct images that look alike: the demo's trousers (28 px) and scikit-learn's handwritten 1s
    (8 px, written at 64 px as the digits fixture does), `per_set` of each."""
    from sklearn.datasets import load_digits
    demo = np.load(Path(__file__).resolve().parents[1] / "data" / "fashion_mnist_demo.npz")
    trousers = demo["images"][demo["labels"] == list(demo["classes"]).index("trouser")][:per_set]
    digits = load_digits()
    ones = digits.images[digits.target == 1][:per_set]
    return ([(f"trouser{i}", Image.fromarray(x).convert("RGB")) for i, x in enumerate(trousers)]
            + [(f"one{i}", digit_image(x)) for i, x in enumerate(ones)])


def digit_image(pixels: np.ndarray, side: int = 64) -> Image.Image:
    """One of scikit-learn's 8x8 digits (grey levels 0-16, ink bright) as a `side` px RGB image."""
    grey = Image.fromarray(np.uint8(255 - pixels * 255 / 16)).resize((side, side), Image.BILINEAR)
    return grey.convert("RGB")


def write_digits(root: Path) -> Path:
    """ROOT/{train,val,test}/{digit}/{i}.png: all 1,797 of scikit-learn's handwritten digits at 64 px, every
    fifth in val and every fifth after it in test; labels nearly all right and no two images copies."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for i, (pixels, digit) in enumerate(zip(digits.images, digits.target)):
        folder = root / ("train", "train", "train", "val", "test")[i % 5] / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        digit_image(pixels).save(folder / f"{i}.png")
    return root


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


def write_duplicate_set(root: Path, folder: Path | None, seed: int = 0) -> None:
    """ROOT/{split}/{a,b}/NAME.png: the photos in train and of each its copies (NAME@KIND.png) in val or
    test; ROOT/{split}/alike/NAME.png: the alike images spread over the three splits."""
    rng = np.random.default_rng(seed)
    for i, (name, im) in enumerate(photo_sources(folder)):
        label = "a" if i % 2 == 0 else "b"
        (root / "train" / label).mkdir(parents=True, exist_ok=True)
        im.save(root / "train" / label / f"{name}.png")
        for j, (kind, transform) in enumerate(TRANSFORMS.items()):
            split = ("val", "test")[(i + j) % 2]
            (root / split / label).mkdir(parents=True, exist_ok=True)
            transform(im, rng).save(root / split / label / f"{name}@{kind}.png")
    for i, (name, im) in enumerate(alike_sources()):
        folder = root / ("train", "val", "test")[i % 3] / "alike"
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{name}.png")


MATCHES = (0.97, 0.98, 0.99, 0.992, 0.995)


def duplicates(folder: Path | None, work: Path | None, k: int = 10) -> dict:
    """Leaks found and distinct pairs reported for each threshold and pixel match, on the set that
    `write_duplicate_set` writes (kept in `work` between runs, if given)."""
    from pipeline.features.extract import extract_folder
    from pipeline.features.settings import ExtractSettings
    with tempfile.TemporaryDirectory() as tmp:
        work = work or Path(tmp)
        root, cache_path = work / "photos", work / "features.h5"
        extract_seconds = None
        if not cache_path.exists():
            write_duplicate_set(root, folder)
            start = time.perf_counter()
            extract_folder(root, cache_path, ExtractSettings(image_size=224), quiet=True)
            extract_seconds = round(time.perf_counter() - start, 1)
        with open_cache(cache_path) as cache:
            images = read_images(cache)
        source = np.array([Path(p).stem.split("@")[0] for p in images.paths])
        kind = np.array([Path(p).stem.split("@")[1] if "@" in p else "original" for p in images.paths])
        copies = np.flatnonzero(kind != "original")
        sims, idx = neighbours.knn(neighbours.search_space(images.features), k)
        check = pixels.PixelCheck(str(root), images.paths)
        per_threshold = []
        settings = [(t, 1.0, None) for t in THRESHOLDS] + [(t, PIXEL_CHECK_FROM, m) for t in THRESHOLDS
                                                            for m in MATCHES]
        for threshold, pixel_from, match in settings:
            pairs = neighbours.neighbour_pairs(sims, idx, min(threshold, pixel_from))
            start = time.perf_counter()
            pairs, counts = pixels.confirm(pairs, threshold, match or 1.0, check)
            found = neighbours.duplicate_groups(pairs, images.splits)
            leaking = set(found.rows[found.leak])
            distinct = source[pairs.a] != source[pairs.b]
            per_threshold.append({
                "threshold": threshold, "pixel_match": match,
                "copies_found_as_leaks": round(float(np.mean([c in leaking for c in copies])), 4),
                **{f"leaks_{t}": round(float(np.mean([c in leaking for c in copies[kind[copies] == t]])), 4)
                   for t in TRANSFORMS},
                "pairs": len(pairs.a), "by_pixels": int(pairs.by_pixels.sum()), "distinct_pairs": int(distinct.sum()),
                "distinct_by_pixels": int((distinct & pairs.by_pixels).sum()),
                "distinct_share": round(float(distinct.sum()) / max(1, len(pairs.a)), 4),
                "pixels_compared": counts["checked"], "pixel_seconds": round(time.perf_counter() - start, 2)})
    return {"part": "duplicates", "originals": int(np.sum(kind == "original")), "copies": len(copies),
            "extract_seconds": extract_seconds, "per_threshold": per_threshold, **machine()}


JUNK = ("flat", "noise", "gradient", "text", "placeholder", "blank_scan")


def junk_image(kind: str, size: tuple[int, int], seed: int) -> Image.Image:
    """An image that shows no object of any class: a flat frame, noise, a gradient, a line of text, a
    'no image' placeholder or a blank scanned page, `size` (width, height)."""
    from PIL import ImageDraw
    rng = np.random.default_rng(seed)
    w, h = size
    if kind == "flat":
        return Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if kind == "gradient":
        along = np.linspace(0, 1, w)[None, :, None]
        ramp = along * rng.uniform(0, 255, 3) + (1 - along) * rng.uniform(0, 255, 3)
        return Image.fromarray(np.repeat(ramp, h, axis=0).astype(np.uint8))
    if kind == "blank_scan":
        page = 235 + rng.normal(0, 4, (h, w, 1)) - np.linspace(0, 12, w)[None, :, None]
        return Image.fromarray(np.clip(np.repeat(page, 3, axis=2), 0, 255).astype(np.uint8))
    image = Image.new("RGB", size, (255, 255, 255) if kind == "text" else (222, 222, 222))
    draw = ImageDraw.Draw(image)
    if kind == "text":
        for line in range(3):
            draw.text((w // 12, h // 4 + line * h // 6), ("Lorem ipsum dolor", "sit amet, 2024", "page 7 of 12")[line],
                      fill=(0, 0, 0), font_size=max(4, h // 9))
    else:   # a framed crossed box, as image hosts show for a missing picture
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        draw.rectangle(box, outline=(150, 150, 150), width=max(1, w // 40))
        draw.line(box, fill=(150, 150, 150), width=max(1, w // 40))
        draw.line((box[0], box[3], box[2], box[1]), fill=(150, 150, 150), width=max(1, w // 40))
    return image


def write_outlier_set(root: Path, which: str, folder: Path | None, copies: int) -> None:
    """ROOT/{split}/{class}/*.png: the demo (`which` 'demo') or the photos with their copies (TRANSFORMS), and
    `copies` junk images of each kind in train, each under a random class (junk@KIND_N.png)."""
    rng = np.random.default_rng(0)
    if which == "demo":
        from pipeline.data.demo import write_image_folder
        write_image_folder(Path(__file__).resolve().parents[1] / "data" / "fashion_mnist_demo.npz", root)
        size = (28, 28)
    else:
        for i, (name, im) in enumerate(photo_sources(folder)):   # and their copies: scenes of 10 images
            (root / "train" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
            im.save(root / "train" / "ab"[i % 2] / f"{name}.png")
            for kind, transform in TRANSFORMS.items():
                transform(im, rng).save(root / "train" / "ab"[i % 2] / f"{name}@{kind}.png")
        size = (640, 480)
    classes = sorted(p.name for p in (root / "train").iterdir())
    for kind in JUNK:
        for n in range(copies):
            image = junk_image(kind, size, seed=len(kind) * 100 + n)
            image.convert("L" if which == "demo" else "RGB").save(
                root / "train" / classes[rng.integers(len(classes))] / f"junk@{kind}_{n}.png")


def outliers(folder: Path | None, work: Path | None, k: int = 10) -> dict:
    """Where the planted junk lands in the outlier ranking, on the demo and on the photos."""
    from pipeline.features.extract import extract_folder
    from pipeline.features.settings import ExtractSettings
    result = {"part": "outliers", "sets": []}
    with tempfile.TemporaryDirectory() as tmp:
        for which, copies, size in (("demo", 2, 160), ("photos", 1, 224)):
            base = (work or Path(tmp)) / f"outliers_{which}"
            cache_path = base / "features.h5"
            if not cache_path.exists():
                write_outlier_set(base / "images", which, folder, copies)
                extract_folder(base / "images", cache_path, ExtractSettings(image_size=size), quiet=True)
            with open_cache(cache_path) as cache:
                images = read_images(cache)
            scores = outlier_ranking.scores(images.features, images.labels, k)
            junk = np.array(["junk@" in p for p in images.paths])
            allowed = max(10, int(np.ceil(0.01 * len(junk))))
            entry = {"set": which, "images": len(junk), "junk": int(junk.sum()), "allowed_rank": allowed}
            for name, score in (("score", scores.score), ("isolation_only", scores.isolation),
                                ("content_only", scores.no_content)):
                rank = np.empty(len(score), int)
                rank[np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")] = np.arange(1, len(score) + 1)
                kinds = [Path(p).stem.split("@")[1] for p in images.paths[junk]]
                entry[name] = {"worst_junk_rank": int(rank[junk].max()),
                               "junk_in_allowed": int((rank[junk] <= allowed).sum()),
                               "ranks": dict(zip(kinds, rank[junk].tolist()))}
            result["sets"].append(entry)
    return {**result, **machine()}


def cached_set(work: Path, name: str, image_size: int) -> Path:
    """The feature cache of a named image set ('demo': the demo's 1,600 Fashion-MNIST images; 'digits':
    scikit-learn's 1,797 handwritten digits at 64 px), extracted with EfficientNet-Lite0 once into `work`."""
    from pipeline.features.extract import extract_folder
    from pipeline.features.settings import ExtractSettings
    cache_path = work / f"{name}_{image_size}.h5"
    if not cache_path.exists():
        if name == "demo":
            from pipeline.data.demo import write_image_folder
            write_image_folder(Path(__file__).resolve().parents[1] / "data" / "fashion_mnist_demo.npz", work / name)
        else:
            write_digits(work / name)
        extract_folder(work / name, cache_path, ExtractSettings(image_size=image_size), quiet=True)
    return cache_path


FLIP_SETS = {"demo": 160, "digits": 64}


def flips(work: Path | None, fraction: float = 0.05, folds: int = 5, seed: int = 0) -> dict:
    """On the demo and the digits, 5% of all labels flipped (seeded): precision and recall of the flagged
    images, flips among the top rows, and what the audit says of its classifier."""
    result = {"part": "flips", "sets": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in FLIP_SETS.items():
            with open_cache(cached_set(work or Path(tmp), name, size)) as cache:
                images = read_images(cache)
                n_classes = len(cache.classes)
            rng = np.random.default_rng(seed)
            flipped = rng.choice(len(images.labels), round(fraction * len(images.labels)), replace=False)
            noisy = images.labels.copy()
            noisy[flipped] = (noisy[flipped] + rng.integers(1, n_classes, len(flipped))) % n_classes
            start = time.perf_counter()
            probabilities = label_issues.out_of_fold_probabilities(images.features, noisy, n_classes, folds, seed=seed)
            seconds = time.perf_counter() - start
            issues = label_issues.find_label_issues(probabilities, noisy, AuditSettings.issue_score)
            hits = np.isin(issues.rows, flipped)
            clean = label_issues.find_label_issues(
                label_issues.out_of_fold_probabilities(images.features, images.labels, n_classes, folds, seed=seed),
                images.labels, AuditSettings.issue_score)
            result["sets"].append({
                "set": name, "image_size": size, "images": len(noisy), "flipped": len(flipped),
                "flagged": len(issues.rows), "precision": round(float(hits.mean()) if len(hits) else 0.0, 4),
                "recall": round(float(hits.sum() / len(flipped)), 4),
                "flips_in_top_rows": int(hits[:len(flipped)].sum()),
                **label_issues.trust(issues, noisy).as_dict(),
                "accuracy_on_true_labels": round(float(np.mean(probabilities.argmax(1) == images.labels)), 4),
                "flagged_without_flips": len(clean.rows),
                "judged_without_flips": label_issues.trust(clean, images.labels).judged,
                "out_of_fold_seconds": round(seconds, 1)})
    return {**result, **machine()}


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


def scale(k: int = 10, folds: int = 5, threshold: float = AuditSettings.duplicate_threshold) -> dict:
    import torch
    torch.set_num_threads(2)
    X, y = scale_vectors()
    before = peak_mb()
    start = time.perf_counter()
    splits = np.array(["train", "val"], dtype=object)[np.arange(len(y)) % 2]
    groups = neighbours.duplicate_groups(neighbours.neighbour_pairs(*neighbours.knn(neighbours.search_space(X), k),
                                                                    threshold), splits)
    outlier_ranking.scores(X, y, k).ranking()
    neighbour_seconds = time.perf_counter() - start
    neighbour_peak = peak_mb()
    start = time.perf_counter()
    probabilities = label_issues.out_of_fold_probabilities(X, y, 10, folds)
    issues = label_issues.find_label_issues(probabilities, y, AuditSettings.issue_score)
    issue_seconds = time.perf_counter() - start
    thumbs = np.random.default_rng(0).integers(0, 256, (2, pixels.MAX_PAIRS, pixels.THUMB, pixels.THUMB), np.uint8)
    start = time.perf_counter()
    for first in range(0, pixels.MAX_PAIRS, 1024):
        pixels.aligned_correlation(thumbs[0, first:first + 1024], thumbs[1, first:first + 1024])
    pixel_seconds = time.perf_counter() - start
    return {"part": "scale", "vectors": list(X.shape), "vectors_mb": round(X.nbytes / 2**20),
            "duplicates_and_outliers_seconds": round(neighbour_seconds, 1),
            "peak_rss_mb_before": round(before), "peak_rss_mb_after_neighbours": round(neighbour_peak),
            "duplicate_groups": len(set(groups.group)), "label_issues_seconds": round(issue_seconds, 1),
            "label_issues": len(issues.rows), "folds": folds,
            "aligned_pixel_pairs": pixels.MAX_PAIRS, "aligned_pixel_seconds": round(pixel_seconds, 1),
            "peak_rss_mb_end": round(peak_mb()), **machine()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("flips", "duplicates", "outliers", "scale"))
    p.add_argument("path", nargs="?", type=Path, help="duplicates, outliers: a folder of more photos")
    p.add_argument("--work", type=Path, help="keep the written images and their caches here, and reuse them")
    args = p.parse_args()
    parts = {"flips": lambda: flips(args.work), "duplicates": lambda: duplicates(args.path, args.work),
             "outliers": lambda: outliers(args.path, args.work), "scale": scale}
    result = parts[args.part]()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
