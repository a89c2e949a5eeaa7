"""What to trust in a prediction, measured on the demo's cache (EfficientNet-Lite0 at 160 px):

    python benchmarks/calibration.py [--work DIR] [--heads logreg,knn,...]
    python benchmarks/calibration.py [--work DIR] --finetune ft_head,ft_partial

- calibration: every head trained by `pipeline train` (temperature on held-out scores, the default),
  its test ECE (15 bins) calibrated and not, and its top-1 from the calibrated and from its own scores;
- familiarity: the logreg model's novelty of the demo's test images and of scikit-learn's 1,797
  handwritten digits written as 28x28 images: the share of each that counts as unfamiliar, and the AUROC
  of novelty (and, for comparison, of one minus the top probability) at telling the digits apart;
- with --finetune: instead, the fine-tune runs of params.yaml named (`finetune.<run>`) on the demo's images,
  their test ECE calibrated and not, and the same familiarity figures from `pipeline predict` on the demo's
  test images and the digits.

`--work DIR` keeps the images, caches and models for the next run. Prints one JSON line per head, then
one for familiarity, and a markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.audit import cached_set, digit_image, machine  # noqa: E402
from pipeline.heads.classifiers import CLASSIFIERS  # noqa: E402
from pipeline.heads.settings import train_settings  # noqa: E402
from pipeline.heads.train import scores_of, train  # noqa: E402
from pipeline.models.directory import open_model  # noqa: E402
from pipeline.storage.cache import open_cache  # noqa: E402


def digits_folder(work: Path) -> Path:
    """scikit-learn's digits as 28x28 images (the demo's size), in split folders."""
    from sklearn.datasets import load_digits
    root = work / "digits28"
    if not root.exists():
        digits = load_digits()
        for i, (pixels, digit) in enumerate(zip(digits.images, digits.target)):
            folder = root / ("train", "train", "train", "val", "test")[i % 5] / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            digit_image(pixels, 28).save(folder / f"{i}.png")
    return root


def digits_cache(work: Path) -> Path:
    """The digits' folder extracted as the demo is, at 160 px."""
    from pipeline.features.extract import extract_folder
    from pipeline.features.settings import ExtractSettings
    cache_path = work / "digits28_160.h5"
    if not cache_path.exists():
        extract_folder(digits_folder(work), cache_path, ExtractSettings(image_size=160), quiet=True)
    return cache_path


def calibration_of(cache: Path, out: Path, head: str) -> dict:
    metrics = train(cache, out, train_settings(head, {}), force=True)
    model = open_model(out)
    test = open_cache(cache).read("test")
    own = scores_of(model.model, test.features, len(model.classes))
    return {"head": head, "temperature": model.calibration.value, "ece": metrics["ece"],
            "ece_uncalibrated": metrics["ece_uncalibrated"], "top1": metrics["top1"],
            "top1_uncalibrated": float(np.mean(own.argmax(1) == test.labels)), "n_test": metrics["n_eval"]}


def familiarity_of(model_dir: Path, cache: Path, digits: Path) -> dict:
    model = open_model(model_dir)
    pre, familiarity = model.model[0], model.familiarity
    test = open_cache(cache).read("test").features
    with open_cache(digits) as c:
        other = np.concatenate([c.read(split).features for split in c.splits])
    novelty = [familiarity.novelty(pre.transform(X)) for X in (test, other)]
    top = [model.calibration.apply(scores_of(model.model, X, len(model.classes))).max(1) for X in (test, other)]
    return separation(novelty, top, familiarity.threshold, familiarity.quantile)


def separation(novelty: list, top: list, threshold: float, quantile: float) -> dict:
    """How novelty (and one minus the top probability) tell the digits from the demo's test images;
    `novelty` and `top`: [the test images', the digits']."""
    from sklearn.metrics import roc_auc_score
    is_digit = np.r_[np.zeros(len(novelty[0])), np.ones(len(novelty[1]))]
    return {"threshold": threshold, "quantile": quantile,
            "test_unfamiliar": float(np.mean(novelty[0] > threshold)),
            "digits_unfamiliar": float(np.mean(novelty[1] > threshold)),
            "auroc_novelty": float(roc_auc_score(is_digit, np.r_[novelty[0], novelty[1]])),
            "auroc_top_probability": float(roc_auc_score(is_digit, -np.r_[top[0], top[1]])),
            "n_test": len(novelty[0]), "n_digits": len(novelty[1])}


def finetuned_trust(work: Path, run: str) -> dict:
    """Fine-tune run `run` of params.yaml on the demo's images: its test ECE calibrated and not, and how its
    novelty (from `pipeline predict`) tells the digits from the demo's test images."""
    import yaml

    from pipeline.data.demo import write_image_folder
    from pipeline.models.predict import predict
    from pipeline.runtime.settings import from_mapping
    from pipeline.tuning.settings import FinetuneSettings
    from pipeline.tuning.training import finetune
    root = Path(__file__).resolve().parents[1]
    if not (work / "demo").exists():
        write_image_folder(root / "data" / "fashion_mnist_demo.npz", work / "demo")
    raw = yaml.safe_load((root / "params.yaml").read_text())["finetune"][run]
    out = work / "models" / run
    m = finetune(work / "demo", out, from_mapping(FinetuneSettings, raw, f"finetune.{run}"), quiet=True, force=True)
    model = open_model(out)
    found = [predict(out, [folder], top_k=1, device="cpu") for folder in (work / "demo" / "test", digits_folder(work))]
    novelty = [np.array([r["novelty"] for r in rows]) for rows in found]
    top = [np.array([r["top"][0]["score"] for r in rows]) for rows in found]
    return {"run": run, "temperature": model.calibration.value, "ece": m["ece"],
            "ece_uncalibrated": m["ece_uncalibrated"], "top1": m["top1"], "n_test": m["n_eval"],
            **separation(novelty, top, model.familiarity.threshold, model.familiarity.quantile)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="keep images, caches and models here")
    parser.add_argument("--heads", default=",".join(CLASSIFIERS), help="comma-separated classifiers")
    parser.add_argument("--finetune", help="comma-separated fine-tune runs of params.yaml, measured instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.finetune:
            runs = [finetuned_trust(work, run) for run in args.finetune.split(",")]
            for r in runs:
                print(json.dumps({**r, **machine()}), flush=True)
            print("\n| run | T | test ECE, own scores | test ECE, calibrated | top-1 | digits unfamiliar | "
                  "test unfamiliar | AUROC novelty | AUROC top probability |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in runs:
                print(f"| {r['run']} | {r['temperature']:.2f} | {r['ece_uncalibrated']:.3f} | {r['ece']:.3f} | "
                      f"{r['top1']:.3f} | {r['digits_unfamiliar']:.1%} | {r['test_unfamiliar']:.1%} | "
                      f"{r['auroc_novelty']:.3f} | {r['auroc_top_probability']:.3f} |")
            return
        cache = cached_set(work, "demo", 160)
        rows = []
        for head in args.heads.split(","):
            rows.append(calibration_of(cache, work / "models" / head, head))
            print(json.dumps(rows[-1]), flush=True)
        if "logreg" not in args.heads.split(","):
            calibration_of(cache, work / "models" / "logreg", "logreg")
        found = familiarity_of(work / "models" / "logreg", cache, digits_cache(work))
        print(json.dumps({**found, **machine()}), flush=True)
    print("\n| head | T | test ECE, own scores | test ECE, calibrated | top-1, own | top-1, calibrated |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['head']} | {r['temperature']:.2f} | {r['ece_uncalibrated']:.3f} | {r['ece']:.3f} | "
              f"{r['top1_uncalibrated']:.3f} | {r['top1']:.3f} |")


if __name__ == "__main__":
    main()
