"""Command line: `pipeline extract|train|predict|compare`. Parsing and calling only."""
from __future__ import annotations

import csv
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import Interrupted, UserError

app = typer.Typer(help="Transfer learning on images: extract features once (stage one), "
                       "train many cheap classifiers on them (stage two).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Dtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def _say(lines, quiet: bool = False) -> None:
    if not quiet:
        for line in lines:
            typer.echo(line, err=True)


@app.command()
def extract(
    data: Annotated[Path, typer.Argument(help="Image folder: ROOT/{train,val,test}/CLASS/*, ROOT/CLASS/*, "
                                              "or ROOT/* with --labels.")],
    out: Annotated[Path, typer.Option(help="HDF5 feature cache to write (atomically). An existing cache "
                                           "made the same way lends the vectors of unchanged "
                                           "images.")] = Path("features.h5"),
    labels: Annotated[Optional[Path], typer.Option(help="CSV with an image column and a label column; "
                                                        "the images lie under DATA.")] = None,
    id_column: Annotated[str, typer.Option(help="--labels column naming each image: a path relative to "
                                                "DATA, with or without extension.")] = "id",
    label_column: Annotated[Optional[str], typer.Option(help="--labels column holding the class; default: "
                                                             "'breed', else 'label'.")] = None,
    backbone: Annotated[str, typer.Option(help="Registry name (efficientnet_lite0, resnet18/34/50/101, vgg16, "
                                               "efficientnet_b0, mobilenet_v3_large, convnext_tiny) "
                                               "or timm/<model>.")] = "efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="'imagenet' (bundled or the torch cache), a path to a local "
                                              "state dict (a classifier that does not fit is left out), "
                                              "or 'none' (random init).")] = "imagenet",
    layer: Annotated[Optional[list[str]], typer.Option(help="Module to hook; spatial outputs are averaged. "
                                                            "Repeat for several feature sets in one file "
                                                            "(the first is the default). Default: the "
                                                            "backbone's global pool (vgg16: the 4096-d "
                                                            "penultimate layer; 'avgpool' gives 25088-d).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Crop size; default: the backbone's own.")] = None,
    compute_stats: Annotated[bool, typer.Option("--compute-stats", help="Normalise with the training split's "
                                                                       "per-channel mean/std instead of "
                                                                       "the backbone's.")] = False,
    tta: Annotated[bool, typer.Option("--tta", help="Average the features of each image and its "
                                                   "horizontal flip (twice the compute).")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when present.")] = Device.auto,
    dtype: Annotated[Dtype, typer.Option(help="Storage type of the feature vectors.")] = Dtype.float16,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader decoding workers; default: "
                                                        "the CPU count, at most 8.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of each class for val unless the data "
                                                     "has split folders.")] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Share of each class for test unless the data "
                                                      "has split folders.")] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed of that split.")] = 0,
    reuse: Annotated[bool, typer.Option(help="Reuse vectors of unchanged images from the cache at --out "
                                             "when it was made the same way.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
):
    """Stage one: run the frozen backbone over every image once and cache the feature vectors."""
    from pipeline.extract import extract_folder
    try:
        summary = extract_folder(data, out, backbone, weights, layer, image_size, val_fraction, test_fraction, seed,
                                 labels=labels, id_column=id_column, label_column=label_column, tta=tta,
                                 compute_stats=compute_stats, reuse=reuse, batch_size=batch_size,
                                 device=device.value, dtype=dtype.value, workers=workers, quiet=quiet)
    except KeyboardInterrupt:   # before any image was written; later ones say how to resume
        raise Interrupted("interrupted before extraction began")
    _say(summary.lines(), quiet)


def _pairs(pairs: list[str], option: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"{option} expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _parse_params(pairs: list[str]) -> dict:
    import yaml
    return {key: yaml.safe_load(value) for key, value in _pairs(pairs, "--param").items()}


@app.command()
def train(
    features: Annotated[Path, typer.Argument(help="Feature cache written by `pipeline extract`.")],
    classifier: Annotated[str, typer.Option(help="logreg, linear_svm, rbf_svm, knn, torch_linear "
                                                 "or torch_mlp.")] = "logreg",
    out: Annotated[Path, typer.Option(help="Model directory to write.")] = Path("model"),
    param: Annotated[list[str], typer.Option(help="KEY=VALUE classifier setting, repeatable, e.g. "
                                                  "C=0.1 (fixes the tuned value instead of searching), "
                                                  "hidden=512, epochs=50.")] = [],
    preprocess: Annotated[str, typer.Option(help="Feature preprocessing: l2, standardize "
                                                 "or none.")] = "l2",
    class_weight: Annotated[Optional[str], typer.Option(help="'balanced' to reweight rare "
                                                             "classes.")] = None,
    cv_folds: Annotated[int, typer.Option(help="Folds for selection when the cache has no "
                                               "test split.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the folds and of the torch heads.")] = 0,
    fingerprint: Annotated[Optional[str], typer.Option(help="Refuse a cache whose fingerprint "
                                                            "differs from this (a prefix will do).")] = None,
    expect: Annotated[list[str], typer.Option(help="FIELD=VALUE the cache must have been made with, "
                                                   "repeatable, e.g. backbone=resnet18, image_size=224, "
                                                   "tta=true; a difference is refused and named.")] = [],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
):
    """Stage two: fit a classifier on cached features, choosing its hyperparameter on val."""
    from pipeline.config import train_settings
    from pipeline.train import train as fit
    raw = {**_parse_params(param), "preprocess": preprocess, "class_weight": class_weight,
           "cv_folds": cv_folds, "seed": seed}
    expected = {**_pairs(expect, "--expect"), **({"fingerprint": fingerprint} if fingerprint else {})}
    m = fit(features, out, train_settings(classifier, raw, where="train"), expected)
    _say([f"{classifier}: top-1 {m['top1']:.3f} on {m['eval_split']} ({m['n_eval']} images), "
          f"chosen {m['hyperparameters']}, fit {m['fit_seconds']:.1f}s -> {out}"], quiet)


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(help="Model directory written by `pipeline train`.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    top_k: Annotated[int, typer.Option(help="Classes to show per image.")] = 5,
    format: Annotated[Format, typer.Option(help="Output format.")] = Format.table,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when present.")] = Device.auto,
):
    """Predict the top-k classes of new images with a trained model (backbone + head)."""
    from pipeline.predict import predict as run
    results = run(model_dir, images, top_k, device.value)
    if format is Format.json:
        typer.echo(json.dumps(results, indent=2))
    elif format is Format.csv:
        w = csv.writer(sys.stdout)
        w.writerow(["path", "rank", "class", "score", "error"])
        for r in results:
            for rank, t in enumerate(r.get("top", []), 1):
                w.writerow([r["path"], rank, t["class"], f"{t['score']:.4f}", ""])
            if "error" in r:
                w.writerow([r["path"], "", "", "", r["error"]])
    else:
        for r in results:
            shown = "  ".join(f"{t['class']} {t['score']:.3f}" for t in r.get("top", []))
            typer.echo(f"{r['path']}: {shown or 'skipped (' + r['error'] + ')'}")
    skipped = [r for r in results if "error" in r]
    if skipped and format is not Format.table:
        _say([f"skipped {r['path']}: {r['error']}" for r in skipped])


@app.command()
def compare(
    model_dirs: Annotated[list[Path], typer.Argument(help="Model directories to compare.")],
    out: Annotated[Path, typer.Option(help="Folder for compare.md and compare.json.")] = Path("reports"),
):
    """Write a table comparing trained models (compare.md, compare.json)."""
    from pipeline.report import compare as run, markdown
    typer.echo(markdown(run(model_dirs, out)), nl=False)


def run_stage(fn) -> None:
    """Run `fn` with the command line's error contract: a UserError is one line and exit code 2;
    an interrupted run says how to resume and exits with 130."""
    try:
        fn()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Interrupted as exc:
        typer.echo(str(exc), err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


def main() -> None:
    run_stage(app)
