"""Command line: `pipeline extract|train|predict|export|compare|finetune|visualize|bench|audit`.
Parsing and calling only."""
from __future__ import annotations

import csv
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.audit.settings import AuditSettings
from pipeline.runtime.errors import Interrupted, UserError, exit_with

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


class Engine(str, Enum):
    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"


ENGINE_HELP = ("What runs the backbone; auto: ONNX Runtime on a CPU (float32, no --compile), torch "
               "otherwise. The ONNX export is cached under ~/.cache/featurecache-pipeline/onnx.")


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
    backbone: Annotated[str, typer.Option(help="Registry name (efficientnet_lite0/1/2, resnet18/34/50/101, vgg16, "
                                               "efficientnet_b0, mobilenet_v3_large, convnext_tiny) "
                                               "or timm/<model>[.<tag>].")] = "efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="'imagenet' or 'pretrained' (bundled, the torch cache, or for "
                                              "timm models the Hugging Face hub cache), a path to a local "
                                              ".pth or .safetensors state dict (a classifier that does not "
                                              "fit is left out), or 'none' (random init).")] = "imagenet",
    layer: Annotated[Optional[list[str]], typer.Option(help="Module to hook; spatial outputs are averaged. "
                                                            "Repeat for several feature sets in one file "
                                                            "(the first is the default). Default: the "
                                                            "backbone's global pool (vgg16: the 4096-d "
                                                            "penultimate layer; 'avgpool' gives 25088-d). "
                                                            "Vision transformers also take cls_token, "
                                                            "patch_mean, cls_patch_mean, cls_last<N>.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Crop size; default: the backbone's own.")] = None,
    compute_stats: Annotated[bool, typer.Option("--compute-stats", help="Normalise with the training split's "
                                                                       "per-channel mean/std instead of "
                                                                       "the backbone's.")] = False,
    tta: Annotated[bool, typer.Option("--tta", help="Average the features of each image and its "
                                                   "horizontal flip (twice the compute).")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per forward pass; default: 256 on CUDA, "
                                                          "16 on a CPU (faster there than larger).")] = None,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when present.")] = Device.auto,
    dtype: Annotated[Dtype, typer.Option(help="Storage type of the feature vectors.")] = Dtype.float16,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader decoding workers; default: "
                                                        "the CPU count, at most 8.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of each class cut out for val (from train when "
                                                     "split folders have no val folder).")] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Share of each class cut out for test (none when "
                                                      "there is a val or test folder).")] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed of that split.")] = 0,
    reuse: Annotated[bool, typer.Option(help="Reuse vectors of unchanged images from the cache at --out "
                                             "when it was made the same way.")] = True,
    precision: Annotated[Precision, typer.Option(help="Compute type of the forward pass; auto: bfloat16 "
                                                      "on CUDA, float32 on CPU.")] = Precision.auto,
    compile: Annotated[bool, typer.Option("--compile", help="Run the model through torch.compile "
                                                           "(pays off on large datasets).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out that is not a feature "
                                                       "cache (refused otherwise).")] = False,
    engine: Annotated[Engine, typer.Option(help=ENGINE_HELP)] = Engine.auto,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    nproc: Annotated[int, typer.Option(help="Processes on this machine (one per GPU), launched through "
                                            "torchrun; each extracts a shard and rank 0 joins them.")] = 1,
):
    """Stage one: run the frozen backbone over every image once and cache the feature vectors."""
    from pipeline.features import sharded
    from pipeline.runtime import distributed
    if nproc > 1:
        sharded.check_extract_options({"compute_stats": compute_stats, "batch_size": batch_size,
                                           "workers": workers})
        sys.exit(distributed.launch(nproc, distributed.without_option(sys.argv[1:], "--nproc")))
    from pipeline.features.extract import extract_folder as single
    extract_folder = sharded.extract_folder if distributed.is_distributed() else single
    try:
        summary = extract_folder(data, out, backbone, weights, layer, image_size, val_fraction, test_fraction, seed,
                                 labels=labels, id_column=id_column, label_column=label_column, tta=tta,
                                 compute_stats=compute_stats, reuse=reuse, batch_size=batch_size,
                                 device=device.value, dtype=dtype.value, workers=workers, quiet=quiet,
                                 precision=precision.value, compile=compile, force=force,
                                 engine=engine.value)
    except KeyboardInterrupt:   # before any image was written; later ones say how to resume
        raise Interrupted("interrupted before extraction began")
    if summary:
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
    from pipeline.heads.train import train as fit
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
    engine: Annotated[Engine, typer.Option(help=ENGINE_HELP)] = Engine.auto,
):
    """Predict the top-k classes of new images with a trained model (backbone + head)."""
    from pipeline.models.predict import predict as run
    results = run(model_dir, images, top_k, device.value, engine=engine.value,
                  log=lambda line: typer.echo(line, err=True))
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
def export(
    model_dir: Annotated[Path, typer.Argument(help="Model directory written by `pipeline train`.")],
    out: Annotated[Path, typer.Option(help="File to write: .pt2 (torch.export) or .onnx.")] = Path("model.pt2"),
):
    """Export backbone + feature preprocessing + head as one file for deployment (linear and torch heads)."""
    from pipeline.models.export import export as run
    _say([f"exported {model_dir} -> {run(model_dir, out)} (input: preprocessed images [N, 3, H, W], "
          f"output: scores [N, classes]; classes and preprocessing in its model.json metadata)"])


@app.command()
def compare(
    model_dirs: Annotated[list[Path], typer.Argument(help="Model directories to compare, or folders "
                                                           "holding them (such as models/).")],
    out: Annotated[Path, typer.Option(help="Folder for compare.md, compare.json and compare.png.")] = Path("reports"),
):
    """Write a table comparing trained models (compare.md, compare.json) and a plot of accuracy
    against compute time (compare.png)."""
    from pipeline.report.compare import compare as run
    from pipeline.report.compare import markdown
    typer.echo(markdown(run(model_dirs, out)), nl=False)


class Strategy(str, Enum):
    full = "full"
    partial = "partial"
    head = "head"
    scratch = "scratch"


class Optimizer(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class Schedule(str, Enum):
    cosine = "cosine"
    plateau = "plateau"


@app.command()
def finetune(
    data: Annotated[Path, typer.Argument(help="Image folder: ROOT/{train,val,test}/CLASS/* or ROOT/CLASS/*.")],
    out: Annotated[Path, typer.Option(help="Model directory to write.")] = Path("finetuned"),
    backbone: Annotated[str, typer.Option(help="Registry name or timm/<model>.")] = "efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="Starting weights: 'imagenet' or a path to a state dict "
                                              "(scratch always starts from random weights).")] = "imagenet",
    strategy: Annotated[Strategy, typer.Option(help="full: all layers; partial: freeze the first --freeze "
                                                    "stages; head: frozen backbone; scratch: random init, "
                                                    "all layers.")] = Strategy.full,
    freeze: Annotated[Optional[int], typer.Option(help="partial: stages to freeze; default: half.")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs in all, head-only ones included.")] = 10,
    head_epochs: Annotated[int, typer.Option(help="Two-phase schedule: train only the head for this many "
                                                  "epochs first, then unfreeze.")] = 0,
    image_size: Annotated[Optional[int], typer.Option(help="Crop size; default: the backbone's own.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    optimizer: Annotated[Optimizer, typer.Option(help="SGD with momentum or AdamW.")] = Optimizer.sgd,
    lr: Annotated[float, typer.Option(help="Learning rate of the new head.")] = 0.01,
    backbone_lr_scale: Annotated[float, typer.Option(help="Backbone learning rate = lr x this "
                                                          "(scratch: 1).")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 1e-4,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    schedule: Annotated[Schedule, typer.Option(help="cosine annealing over the epochs, or step-on-plateau "
                                                    "of val accuracy.")] = Schedule.cosine,
    plateau_patience: Annotated[int, typer.Option(help="plateau: epochs without val improvement before "
                                                       "the learning rate decays.")] = 2,
    plateau_factor: Annotated[float, typer.Option(help="plateau: decay factor.")] = 0.1,
    max_decays: Annotated[int, typer.Option(help="plateau: stop at the next plateau after this many "
                                                 "decays.")] = 2,
    patience: Annotated[Optional[int], typer.Option(help="Early stopping: epochs without val "
                                                         "improvement; default: off.")] = None,
    random_crop: Annotated[bool, typer.Option(help="Augment: random resized crop (50-100% of the "
                                                   "area).")] = True,
    flip: Annotated[bool, typer.Option(help="Augment: random horizontal flip.")] = True,
    rotation: Annotated[float, typer.Option(help="Augment: random rotation up to this many "
                                                 "degrees.")] = 0.0,
    color_jitter: Annotated[float, typer.Option(help="Augment: brightness/contrast/saturation "
                                                     "jitter strength.")] = 0.0,
    device: Annotated[Device, typer.Option(help="auto picks CUDA (mixed precision, channels-last) "
                                                "when present.")] = Device.auto,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader decoding workers; default: the CPU "
                                                        "count, at most 8.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of each class cut out for val (from train when "
                                                     "split folders have no val folder).")] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Share of each class cut out for test (none when "
                                                      "there is a val or test folder).")] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed of the split, the head and the batch order.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")] = False,
    scale_lr: Annotated[bool, typer.Option(help="Under torchrun: multiply --lr by the number of processes "
                                                "(linear scaling rule for the larger global batch).")] = True,
    checkpoint: Annotated[bool, typer.Option("--checkpoint", help="Rewrite OUT/checkpoint.pt after every "
                                                                 "epoch, for --resume.")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Carry on from a checkpoint.pt written with the "
                                                        "same settings (implies --checkpoint).")] = None,
    nproc: Annotated[int, typer.Option(help="Processes on this machine (one per GPU), launched through "
                                            "torchrun; trains with DistributedDataParallel.")] = 1,
):
    """Optional stage: fine-tune the backbone with a new head (or train it from scratch), keep the
    best epoch by val accuracy, and write a model directory that predict and compare accept."""
    from pipeline.runtime import distributed
    if nproc > 1:
        sys.exit(distributed.launch(nproc, distributed.without_option(sys.argv[1:], "--nproc")))
    from pipeline.finetune.training import FinetuneSettings
    from pipeline.finetune.training import finetune as run
    s = FinetuneSettings(backbone=backbone, weights=weights, strategy=strategy.value, freeze=freeze, epochs=epochs,
                         head_epochs=head_epochs, image_size=image_size, batch_size=batch_size,
                         optimizer=optimizer.value, lr=lr, backbone_lr_scale=backbone_lr_scale,
                         weight_decay=weight_decay, momentum=momentum, schedule=schedule.value,
                         plateau_patience=plateau_patience, plateau_factor=plateau_factor, max_decays=max_decays,
                         patience=patience, random_crop=random_crop, flip=flip, rotation=rotation,
                         color_jitter=color_jitter, device=device.value, workers=workers,
                         val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, scale_lr=scale_lr)
    m = run(data, out, s, quiet, checkpoint, resume)
    if m is None:   # a torchrun rank other than 0
        return
    _say([f"{strategy.value}: top-1 {m['top1']:.3f} on {m['eval_split']} ({m['n_eval']} images), best epoch "
          f"{m['best_epoch']} of {m['epochs_run']}, {m['fit_seconds']:.1f}s on {m['device']} -> {out}"]
         + ([f"skipped {m['n_skipped']} files (reasons in {out / 'model.json'})"] if m["n_skipped"] else []), quiet)


@app.command()
def visualize(
    model_dir: Annotated[Path, typer.Argument(help="Model directory (either kind).")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders; an image in a folder named "
                                                      "after a class is checked against it.")],
    out: Annotated[Path, typer.Option(help="Folder for predictions.png (and gradcam.png).")] = Path("visual"),
    limit: Annotated[int, typer.Option(help="Images to show at most.")] = 24,
    gradcam: Annotated[bool, typer.Option(help="Also write Grad-CAM heat maps (fine-tuned models and "
                                               "every head but knn and rbf_svm).")] = False,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when present.")] = Device.auto,
):
    """Show predictions on a grid of images (wrong ones in red) and, with --gradcam, where the model looked."""
    from pipeline.models import visualize as vis
    out.mkdir(parents=True, exist_ok=True)
    grid = vis.prediction_grid(model_dir, images, out / "predictions.png", limit, device.value)
    lines = [f"{grid['shown']} images, {grid['wrong']} wrong -> {out / 'predictions.png'}"]
    if gradcam:
        cams = vis.gradcam(model_dir, images, out / "gradcam.png", min(limit, 12), device.value)
        lines.append(f"Grad-CAM of {cams['shown']} images -> {out / 'gradcam.png'}")
    _say(lines)


@app.command()
def bench(
    data: Annotated[Path, typer.Argument(help="Image folder (e.g. from benchmarks/make_images.py).")],
    out: Annotated[Optional[Path], typer.Option(help="JSON file for the results.")] = None,
    images: Annotated[Optional[int], typer.Option(help="Use only the first N images.")] = None,
    backbone: Annotated[str, typer.Option(help="Registry name or timm/<model>.")] = "efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="'imagenet', a local state dict, or 'none' "
                                              "(random init: same speed).")] = "imagenet",
    image_size: Annotated[Optional[int], typer.Option(help="Crop size; default: the backbone's own.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per forward pass; default: 256 on CUDA, "
                                                          "16 on a CPU (faster there than larger).")] = None,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when present.")] = Device.auto,
    precision: Annotated[Precision, typer.Option(help="Compute type of extract and model-only.")] = Precision.auto,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile for extract and model-only.")] = False,
    workers: Annotated[Optional[int], typer.Option(help="Extract's DataLoader workers; default: "
                                                        "the CPU count, at most 8.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs of each, interleaved; the best counts.")] = 2,
    tutorial: Annotated[bool, typer.Option(help="Also time the tutorial-style loop.")] = True,
    engine: Annotated[Optional[list[str]], typer.Option(help="Engine to time, repeatable: torch, onnxruntime, "
                                                             "openvino (model alone, if installed); default: "
                                                             "torch and, on a CPU, onnxruntime.")] = None,
):
    """Images/s of the tutorial-style loop, of `pipeline extract` and of the model alone, side by side."""
    from pipeline.features.bench import bench as run
    from pipeline.features.bench import table, write_json
    results = run(data, backbone, weights, image_size, batch_size, device.value, precision.value, compile,
                  workers, repeats, images, skip_tutorial=not tutorial, engines=engine,
                  log=lambda line: typer.echo(line, err=True))
    typer.echo(table(results), nl=False)
    if out:
        write_json(results, out)


@app.command()
def audit(
    features: Annotated[Path, typer.Argument(help="Feature cache written by `pipeline extract`.")],
    out: Annotated[Path, typer.Option(help="Folder for the report: index.html, the CSVs, learning_curve.png "
                                           "and summary.json.")] = Path("reports/audit"),
    folds: Annotated[int, typer.Option(help="Stratified folds of the out-of-fold probabilities behind the "
                                            "label issues.")] = AuditSettings.folds,
    neighbours: Annotated[int, typer.Option(help="k of the k-nearest-neighbour outlier scores and "
                                                 "duplicate search.")] = AuditSettings.neighbours,
    duplicate_threshold: Annotated[float, typer.Option(help="Cosine similarity from which two images count as "
                                                            "near-duplicates.")] = AuditSettings.duplicate_threshold,
    outlier_cut: Annotated[float, typer.Option(help="An image is an outlier from this isolation: its k-NN "
                                                    "distance over the median image's.")] = AuditSettings.outlier_cut,
    seeds: Annotated[int, typer.Option(help="Draws per point of the learning curve.")] = AuditSettings.seeds,
    seed: Annotated[int, typer.Option(help="Seed of the folds, the k-means and the draws.")] = AuditSettings.seed,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines or summary.")] = False,
):
    """Check the data behind a cache: label issues, near-duplicates and leaks between splits, outliers, and
    how accuracy grows with the number of labels; writes a report page and CSV files."""
    from pipeline.audit.run import audit as run
    from pipeline.report.audit_page import write_page
    s = AuditSettings(folds=folds, neighbours=neighbours, duplicate_threshold=duplicate_threshold,
                      outlier_cut=outlier_cut, seeds=seeds, seed=seed)
    summary = run(features, out, s, log=lambda line: _say([line], quiet))
    page = write_page(out)
    _say([f"{summary['label_issues']} label issues, {summary['duplicate_groups']} near-duplicate groups "
          f"({summary['leak_groups']} across splits), {summary['outliers']} outliers in {summary['images']} "
          f"images -> {page}"], quiet)


def run_stage(fn) -> None:
    """Run `fn` with the command line's error contract: a UserError, or a file the system refuses (no
    permission, a file where a folder is needed), is one line and exit code 2; an interrupted run says
    how to resume and exits with 130."""
    try:
        fn()
    except UserError as exc:
        exit_with(2, f"error: {exc}")
    except OSError as exc:
        if exc.filename is None:
            raise
        exit_with(2, f"error: {exc.filename}: {exc.strerror or exc}")
    except Interrupted as exc:
        exit_with(130, str(exc))
    except KeyboardInterrupt:
        exit_with(130, "interrupted")


def main() -> None:
    run_stage(app)
