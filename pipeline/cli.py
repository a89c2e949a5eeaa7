"""Command line: `pipeline extract|train|predict|compare|bench`. Parsing and calling only."""
from __future__ import annotations

import csv
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import UserError

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


class Precision(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


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
    data: Annotated[Path, typer.Argument(help="Image folder: ROOT/{train,val,test}/CLASS/* or ROOT/CLASS/*.")],
    out: Annotated[Path, typer.Option(help="HDF5 feature cache to write (atomically).")] = Path("features.h5"),
    backbone: Annotated[str, typer.Option(help="Registry name (efficientnet_lite0, resnet50, ...) "
                                               "or timm/<model>.")] = "efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="'imagenet', a path to a local state dict, "
                                              "or 'none' (random init).")] = "imagenet",
    layer: Annotated[Optional[str], typer.Option(help="Module to hook; default: the backbone's "
                                                      "global pool.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Crop size; default: the backbone's own.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when present.")] = Device.auto,
    dtype: Annotated[Dtype, typer.Option(help="Storage type of the feature vectors.")] = Dtype.float16,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader decoding workers; default: "
                                                        "the CPU count, at most 8.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of each class for val when the folder "
                                                     "has no split folders.")] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Share of each class for test when the folder "
                                                      "has no split folders.")] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed of that split.")] = 0,
    precision: Annotated[Precision, typer.Option(help="Compute type of the forward pass; auto: bfloat16 "
                                                      "on CUDA, float32 on CPU.")] = Precision.auto,
    compile: Annotated[bool, typer.Option("--compile", help="Run the model through torch.compile "
                                                           "(pays off on large datasets).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
):
    """Stage one: run the frozen backbone over every image once and cache the feature vectors."""
    from pipeline.extract import extract_folder
    summary = extract_folder(data, out, backbone, weights, layer, image_size, val_fraction, test_fraction, seed,
                             batch_size=batch_size, device=device.value, dtype=dtype.value, workers=workers,
                             quiet=quiet, precision=precision.value, compile=compile)
    _say(summary.lines(), quiet)


def _parse_params(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--param expects KEY=VALUE, got {pair!r}")
        import yaml
        out[key] = yaml.safe_load(value)
    return out


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
                                                            "differs from this.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
):
    """Stage two: fit a classifier on cached features, choosing its hyperparameter on val."""
    from pipeline.config import train_settings
    from pipeline.train import train as fit
    raw = {**_parse_params(param), "preprocess": preprocess, "class_weight": class_weight,
           "cv_folds": cv_folds, "seed": seed}
    m = fit(features, out, train_settings(classifier, raw), fingerprint)
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


@app.command()
def bench(
    data: Annotated[Path, typer.Argument(help="Image folder (e.g. from benchmarks/make_images.py).")],
    out: Annotated[Optional[Path], typer.Option(help="JSON file for the results.")] = None,
    images: Annotated[Optional[int], typer.Option(help="Use only the first N images.")] = None,
    backbone: Annotated[str, typer.Option(help="Registry name or timm/<model>.")] = "efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="'imagenet', a local state dict, or 'none' "
                                              "(random init: same speed).")] = "imagenet",
    image_size: Annotated[Optional[int], typer.Option(help="Crop size; default: the backbone's own.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when present.")] = Device.auto,
    precision: Annotated[Precision, typer.Option(help="Compute type of extract and model-only.")] = Precision.auto,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile for extract and model-only.")] = False,
    workers: Annotated[Optional[int], typer.Option(help="Extract's DataLoader workers; default: "
                                                        "the CPU count, at most 8.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs of each, interleaved; the best counts.")] = 2,
    tutorial: Annotated[bool, typer.Option(help="Also time the tutorial-style loop.")] = True,
):
    """Images/s of the tutorial-style loop, of `pipeline extract` and of the model alone, side by side."""
    from pipeline.bench import bench as run, table, write_json
    result = run(data, backbone, weights, image_size, batch_size, device.value, precision.value, compile,
                 workers, repeats, images, skip_tutorial=not tutorial, log=lambda line: typer.echo(line, err=True))
    typer.echo(table([result]), nl=False)
    if out:
        write_json(result, out)


def run_stage(fn) -> None:
    """Run `fn` with the command line's error contract: a UserError is one line and exit code 2."""
    try:
        fn()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


def main() -> None:
    run_stage(app)
