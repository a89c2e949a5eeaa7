"""Multi-label heads on a generated multi-label set: 2x2 mosaics of the demo's Fashion-MNIST items, each showing
1-4 of the 10 classes (pipeline.data.demo.write_mosaics), extracted with EfficientNet-Lite0:

    python benchmarks/multilabel.py [--images 1200] [--image-size 160] [--seed 0] [--work DIR] [--finetune STRATEGY --epochs N]

For the one-vs-rest logistic regression (`pipeline train --classifier logreg` on the multi-label cache) it
reports the test macro and micro AP, the macro F1 with the model's per-class thresholds (docs/multilabel.md)
and with a fixed threshold of 0.5, its ECE, and the macro F1 of a single-label logistic regression trained on
each image's first tag (its one predicted class taken as the image's only label), chosen by the same protocol.
`--seed` draws another set of mosaics. With --finetune, also the test macro AP and macro F1 of `pipeline finetune
--multi-label` with that strategy on the same images and split. Prints one JSON line.

`--rules` instead compares threshold rules for the same logreg (C chosen on val, refitted on train+val), by
their test macro F1: a fixed 0.5; each class's F1 peak on val scores of the model fitted on train (the
earlier default); its F1 peak on out-of-fold scores of train+val (`--calibration none`); half the best F1 on
those scores calibrated by one temperature per class (`--calibration temperature`) or by per-class Platt scaling
(the default).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import api  # noqa: E402
from pipeline.data.demo import write_mosaics  # noqa: E402
from pipeline.heads.metrics import evaluate_multilabel  # noqa: E402
from pipeline.heads.multilabel import scores_of  # noqa: E402
from pipeline.heads.train import _fit, select  # noqa: E402
from pipeline.storage.cache import open_cache  # noqa: E402

ARCHIVE = Path(__file__).resolve().parents[1] / "data" / "fashion_mnist_demo.npz"


def mosaic_cache(work: Path, images: int, image_size: int, seed: int = 0) -> Path:
    """The multi-label cache of `images` mosaics under `work` (reused when already there)."""
    name = f"mosaics-{images}" + (f"-seed{seed}" if seed else "")
    out = work / f"{name}-{image_size}.h5"
    if not out.exists():
        labels = write_mosaics(ARCHIVE, work / name, images, seed)
        api.extract(labels.parent, out, labels=str(labels), label_column="tags", multi_label=True,
                    image_size=image_size, quiet=True)
    return out


def measure(cache_path: Path, work: Path) -> dict:
    """The figures the module docstring lists, for logreg."""
    model = api.train(cache_path, "logreg", work / "logreg-multilabel", force=True)
    thresholds = np.array([model.thresholds[c] for c in model.classes])
    with open_cache(cache_path) as cache:
        train_, val, test = (cache.read(split) for split in ("train", "val", "test"))
    scores = scores_of(model._directory.model, test.features)
    fixed = evaluate_multilabel(test.labels, scores, np.full(len(thresholds), 0.5), model.classes)
    single = _first_tag_f1(model, train_, val, test)
    return {"images": len(train_.labels) + len(val.labels) + len(test.labels), "classes": len(model.classes),
            "macro_ap": model.metrics["macro_ap"], "micro_ap": model.metrics["micro_ap"],
            "macro_f1_tuned": model.metrics["macro_f1"], "macro_f1_at_0.5": fixed["macro_f1"],
            "ece": model.metrics["ece"], "ece_uncalibrated": model.metrics["ece_uncalibrated"],
            "macro_f1_single_label": single, "subset_accuracy": model.metrics["subset_accuracy"]}


def measure_finetune(cache: Path, image_size: int, strategy: str, epochs: int) -> dict:
    """The figures of a multi-label fine-tune run on the mosaics of `cache` (`mosaic_cache`)."""
    labels = cache.parent / cache.name.rsplit("-", 1)[0] / "labels.csv"
    m = api.finetune(labels.parent, cache.parent / f"finetune-{strategy}", force=True, quiet=True, labels=str(labels),
                     label_column="tags", multi_label=True, strategy=strategy, epochs=epochs,
                     image_size=image_size).metrics
    return {"finetune": strategy, "finetune_epochs": epochs, "finetune_best_epoch": m["best_epoch"],
            "finetune_macro_ap": m["macro_ap"], "finetune_macro_f1": m["macro_f1"],
            "finetune_fit_seconds": round(m["fit_seconds"], 1)}


def _first_tag_f1(model, train_, val, test) -> float:
    """Macro F1 on test of a single-label logreg trained on each image's first tag (the first of its labels in
    class order), chosen on val and refitted on train+val as `pipeline train` does."""
    from pipeline.heads.settings import TrainSettings
    first = [split.labels.argmax(1) for split in (train_, val)]
    s = TrainSettings(classifier="logreg")
    chosen = select(s, train_.features, first[0], val.features, first[1])
    head = _fit(s, chosen.value, np.concatenate([train_.features, val.features]), np.concatenate(first))
    predicted = np.eye(len(model.classes))[head.predict(test.features)]
    return evaluate_multilabel(test.labels, predicted, np.full(len(model.classes), 0.5), model.classes)["macro_f1"]


def threshold_rules(cache_path: Path) -> dict:
    """Test macro F1 of logreg under each threshold rule of the module docstring."""
    from pipeline.heads.calibration import ClassPlatt, ClassTemperatures
    from pipeline.heads.metrics import half_best_f1_thresholds, tuned_thresholds
    from pipeline.heads.settings import TrainSettings
    from pipeline.heads.train import ZooHead, out_of_fold_scores
    with open_cache(cache_path) as cache:
        train_, val, test = (cache.read(split) for split in ("train", "val", "test"))
    s = TrainSettings(classifier="logreg")
    head = ZooHead(s)
    chosen = head.select(s, train_.features, train_.labels, val.features, val.labels)
    X, Y = np.concatenate([train_.features, val.features]), np.concatenate([train_.labels, val.labels])
    scores = scores_of(head.refit(s, chosen, X, Y), test.features)
    on_val = scores_of(head.refit(s, chosen, train_.features, train_.labels), val.features)
    oof = out_of_fold_scores(s, head, chosen, X, Y, Y.shape[1])
    temperatures = ClassTemperatures.fit(oof, Y, True)
    platt = ClassPlatt.fit(oof, Y, True)

    def f1(calibrated, thresholds):
        return evaluate_multilabel(test.labels, calibrated, thresholds, [str(c) for c in range(Y.shape[1])])["macro_f1"]
    return {"C": chosen.value, "fixed_0.5": f1(scores, np.full(Y.shape[1], 0.5)),
            "val_f1_peak": f1(scores, tuned_thresholds(val.labels, on_val, 0.5)[0]),
            "oof_f1_peak": f1(scores, tuned_thresholds(Y, oof, 0.5)[0]),
            "oof_temperature_half_f1": f1(temperatures.apply(scores),
                                          half_best_f1_thresholds(Y, temperatures.apply(oof))[0]),
            "oof_platt_half_f1": f1(platt.apply(scores), half_best_f1_thresholds(Y, platt.apply(oof))[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0, help="of the mosaics")
    parser.add_argument("--rules", action="store_true", help="compare threshold rules instead")
    parser.add_argument("--work", type=Path, default=None, help="keep the images, cache and model here")
    parser.add_argument("--finetune", choices=("full", "partial", "head", "scratch"), default=None,
                        help="also fine-tune with this strategy")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the fine-tune run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache = mosaic_cache(work, args.images, args.image_size, args.seed)
        figures = threshold_rules(cache) if args.rules else measure(cache, work)
        if args.finetune:
            figures.update(measure_finetune(cache, args.image_size, args.finetune, args.epochs))
        print(json.dumps({"image_size": args.image_size, "seed": args.seed, **figures}))


if __name__ == "__main__":
    main()
