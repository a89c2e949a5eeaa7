"""Command line: `pipeline extract|train|predict|export|compare|finetune|visualize|bench|audit|select`. Parsing and
calling only: the options of a stage are the fields of its settings object (pipeline.runtime.settings)."""
from __future__ import annotations

import csv
import functools
import importlib
import inspect
import json
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from typer.core import TyperCommand

from pipeline.auditing.settings import AuditSettings
from pipeline.features.settings import BenchSettings, ExtractSettings
from pipeline.tuning.settings import FinetuneSettings
from pipeline.heads.settings import CLASSIFIERS, TrainSettings, own_keys, with_params
from pipeline.models.settings import PredictSettings
from pipeline import api
from pipeline.runtime.devices import DEVICES, device_setting
from pipeline.runtime.errors import Interrupted, InputError, exit_with, quote, run_stage
from pipeline.runtime.imports import heavy_imports, preload
from pipeline.runtime.printing import say
from pipeline.runtime.settings import (alternatives, default, fields, from_options, keywords, option_name, rule,
                                       type_hints)
from pipeline.selection.settings import SelectSettings


class Command(TyperCommand):
    """A subcommand whose arguments read `DATA`, not `{data}`, and whose Ctrl-C says what stopped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument" and param.metavar is None:
                param.metavar = param.name.upper()

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [piece[1:].replace("}", "", 1) if piece.startswith("{") else piece
                for piece in super().collect_usage_pieces(ctx)]

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: pipeline {self.name} stopped")


class App(typer.Typer):
    def command(self, *args, cls=Command, **kwargs):
        return super().command(*args, cls=cls, **kwargs)


app = App(help="Transfer learning on images: extract features once (stage one), "
               "train many cheap classifiers on them (stage two).",
          pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)


def _option_type(hint, r):
    """The type typer parses an option as: the field's type, its choices as a Literal."""
    kinds = alternatives(hint)
    optional = type(None) in kinds
    (kind,) = [k for k in kinds if k is not type(None)]
    if r.choices and typing.get_origin(kind) is not list:   # typer takes no list of Literal: checked after
        kind = Literal[r.choices]
    return Optional[kind] if optional else kind


def settings_options(cls):
    """Decorator: the command's `settings` parameter becomes one option per field of settings class `cls`
    (help: the field's doc and range), and the command receives them checked, as one `cls`."""
    def decorate(command):
        hints = type_hints(cls)
        options = []
        for f in fields(cls):
            r = rule(f)
            if not r.option:
                continue
            names = [option_name(f.name)] if hints[f.name] is bool and not default(f) else []   # a flag
            help_text = f"{r.doc}  [{r.describe()}]" if r.describe() else r.doc
            kind = _option_type(hints[f.name], r)
            listed = any(typing.get_origin(k) is list for k in alternatives(hints[f.name]))
            repeated = {"metavar": f.name.upper()} if listed else {}   # a repeatable option
            options.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default(f),
                                             annotation=Annotated[kind, typer.Option(*names, help=help_text,
                                                                                     **repeated)]))
        signature = inspect.signature(command, eval_str=True)
        params = []
        for p in signature.parameters.values():
            params += options if p.name == "settings" else [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)]

        @functools.wraps(command)
        def run(**kwargs):
            values = {p.name: kwargs.pop(p.name) for p in options}
            return command(settings=from_options(cls, values), **kwargs)

        run.__signature__ = signature.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run
    return decorate


Device = Enum("Device", {name: name for name in DEVICES}, type=str)   # visualize's --device


FeatureCachePath = Annotated[Path, typer.Argument(help="Feature cache written by `pipeline extract`.")]
QuietSummary = Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")]


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def _say(lines, quiet: bool = False) -> None:
    if not quiet:
        for line in lines:
            say(line)


@app.command()
@settings_options(ExtractSettings)
def extract(
    data: Annotated[Path, typer.Argument(help="Image folder: ROOT/{train,val,test}/CLASS/*, ROOT/CLASS/*, "
                                              "or ROOT/* with --labels.")],
    out: Annotated[Path, typer.Option(help="HDF5 feature cache to write (atomically). An existing cache "
                                           "made the same way lends the vectors of unchanged "
                                           "images.")] = Path("features.h5"),
    settings: ExtractSettings = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out that is not a feature "
                                                       "cache (refused otherwise).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    nproc: Annotated[int, typer.Option(help="Processes on this machine (one per GPU), launched through "
                                            "torchrun; each extracts a shard and rank 0 joins them.")] = 1,
):
    """Stage one: run the frozen backbone over every image once and cache the feature vectors."""
    preload("pipeline.features.extract")
    from pipeline.features import sharded
    from pipeline.runtime import distributed
    if nproc > 1:
        sharded.check_extract_options(settings)
        sys.exit(distributed.launch(nproc, distributed.without_option(sys.argv[1:], "--nproc")))
    try:
        cache = api.extract(data, out, force=force, quiet=quiet, **keywords(settings))
    except KeyboardInterrupt:   # before any image was written; later ones say how to resume
        raise Interrupted("interrupted before extraction began")
    if cache:
        _say(cache.summary.lines, quiet)


def _check_cache(path: Path) -> None:
    """Refuse a missing or damaged feature cache at once, before the seconds of importing what reads it."""
    from pipeline.storage.cache import open_cache
    open_cache(path).close()


def _check_model(path: Path) -> None:
    """Refuse a missing model directory or malformed model.json at once, before the seconds of importing what
    runs it. Its files' digests are checked when the stage loads them, once: they can be large."""
    from pipeline.storage.modeldir import read_info
    read_info(path)


def _pairs(pairs: list[str], option: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InputError(f"{option} expects KEY=VALUE, got {quote(pair)}")
        out[key] = value
    return out


def _parse_params(pairs: list[str]) -> dict:
    import yaml
    return {key: yaml.safe_load(value) for key, value in _pairs(pairs, "--param").items()}


@app.command()
@settings_options(TrainSettings)
def train(
    features: FeatureCachePath,
    out: Annotated[Path, typer.Option(help="Model directory to write.")] = Path("model"),
    settings: TrainSettings = None,
    param: Annotated[list[str], typer.Option(metavar="KEY=VALUE", help="KEY=VALUE, repeatable: the tuned value (fixed instead of "
                                                  "searched) or a setting of the classifier: "
                                                  + "; ".join(f"{name}: {', '.join(own_keys(name))}"
                                                              for name in CLASSIFIERS) + ".")] = [],
    fingerprint: Annotated[Optional[str], typer.Option(help="Refuse a cache whose fingerprint "
                                                            "differs from this (a prefix will do).")] = None,
    expect: Annotated[list[str], typer.Option(metavar="FIELD=VALUE", help="FIELD=VALUE the cache must have been made with, "
                                                   "repeatable, e.g. backbone=resnet18, image_size=224, "
                                                   "tta=true; a difference is refused and named.")] = [],
    quiet: QuietSummary = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a model directory already at --out.")] = False,
):
    """Stage two: fit a classifier on cached features, choosing its hyperparameter on val."""
    params = _parse_params(param)
    s = with_params(settings, params, lambda key: f"--param {key}")
    expected = {**_pairs(expect, "--expect"), **({"fingerprint": fingerprint} if fingerprint else {})}
    from pipeline.storage.modeldir import check_out
    check_out(out, force)       # as `train` checks first, before the seconds of its imports
    _check_cache(features)
    with heavy_imports():
        from pipeline.heads.classifiers import import_libraries
        importlib.import_module("pipeline.heads.train")
        import_libraries(s.classifier)
    common = {k: v for k, v in keywords(s).items() if k != "classifier"}
    try:
        model = api.train(features, s.classifier, out, force=force, expect=expected, **common, **params)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: training {s.classifier} on {features} stopped before {out} was written "
                          f"in full; run the same command again")
    m = model.metrics
    from pipeline.heads.metrics import headline
    _say([f"{s.classifier}: {headline(m)} on {m['eval_split']} ({m['n_eval']} images), "
          f"chosen {model.details['hyperparameters']}, fit {m['fit_seconds']:.1f}s -> {out}"], quiet)


@app.command()
@settings_options(PredictSettings)
def predict(
    model_dir: Annotated[Path, typer.Argument(help="Model directory written by `pipeline train`.", metavar="DIR")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.", metavar="IMAGE_OR_FOLDER")],
    settings: PredictSettings = None,
    format: Annotated[Format, typer.Option(help="Output format.")] = Format.table,
):
    """Predict the top-k classes of new images with a trained model (backbone + head)."""
    _check_model(model_dir)
    preload("pipeline.models.predict")
    results = api.load_model(model_dir).predict(images, settings.top_k, settings.device, settings.engine,
                                                log=lambda line: typer.echo(line, err=True))
    if format is Format.json:
        typer.echo(json.dumps([{"path": r.path, **({"error": r.skipped} if r.skipped else {
            "scores": r.score_kind, "top": [{"class": c, "score": v} for c, v in zip(r.labels, r.scores)],
            **({"labels": list(r.tags), "label_scores": list(r.tags.values())} if r.tags is not None else {}),
            **({"familiar": r.familiar, "novelty": r.novelty} if r.novelty is not None else {})})}
            for r in results], indent=2))
    elif format is Format.csv:
        w = csv.writer(sys.stdout)
        tagged = ["labelled"] * any(r.tags is not None for r in results)   # multi-label: reaches its threshold
        w.writerow(["path", "rank", "class", "score", *tagged, "scores", "familiar", "novelty", "error"])
        for r in results:
            known = [str(r.familiar).lower(), f"{r.novelty:.4f}"] if r.novelty is not None else ["", ""]
            shown = list(zip(r.labels, r.scores)) + [t for t in (r.tags or {}).items() if t[0] not in r.labels]
            for rank, (label, score) in enumerate(shown, 1):
                mark = [str(label in (r.tags or {})).lower()] * bool(tagged)
                w.writerow([r.path, rank if rank <= len(r.labels) else "", label, f"{score:.4f}", *mark,
                            r.score_kind, *known, ""])
            if r.skipped:
                w.writerow([r.path, "", "", "", *[""] * bool(tagged), "", "", "", r.skipped])
    else:
        for r in results:
            shown = "  ".join(f"{label} {score:.3f}" for label, score in zip(r.labels, r.scores))
            if r.tags is not None:
                shown = f"labels: {', '.join(r.tags) or 'none'}  (top: {shown})"
            note = "" if r.score_kind == "probabilities" else f"  ({r.score_kind}, not probabilities)"
            if r.familiar is False:
                note += f"  (unfamiliar: novelty {r.novelty:.3f}, unlike the training images)"
            say(f"{r.path}: skipped ({r.skipped})" if r.skipped else f"{r.path}: {shown}{note}", err=False)
    skipped = [r for r in results if r.skipped]
    if skipped and format is not Format.table:
        _say([f"skipped {r.path}: {r.skipped}" for r in skipped])


@app.command()
def export(
    model_dir: Annotated[Path, typer.Argument(help="Model directory written by `pipeline train`.")],
    out: Annotated[Path, typer.Option(help="File to write: .pt2 (torch.export) or .onnx.")] = Path("model.pt2"),
):
    """Export backbone + feature preprocessing + head as one file for deployment (linear and torch heads)."""
    _check_model(model_dir)
    with heavy_imports():
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
    with heavy_imports():
        from pipeline.report.compare import markdown
    for line in markdown(api.compare(model_dirs, out)).splitlines():
        say(line, err=False)


@app.command()
@settings_options(FinetuneSettings)
def finetune(
    data: Annotated[Path, typer.Argument(help="Image folder: ROOT/{train,val,test}/CLASS/*, ROOT/CLASS/*, "
                                              "or ROOT/* with --labels.")],
    out: Annotated[Path, typer.Option(help="Model directory to write.")] = Path("finetuned"),
    settings: FinetuneSettings = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")] = False,
    checkpoint: Annotated[bool, typer.Option("--checkpoint", help="Rewrite OUT/checkpoint.safetensors after "
                                                                 "every epoch, for --resume.")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Carry on from a checkpoint.safetensors written "
                                                        "with the same settings (implies --checkpoint).")] = None,
    nproc: Annotated[int, typer.Option(help="Processes on this machine (one per GPU), launched through "
                                            "torchrun; trains with DistributedDataParallel.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Replace a model directory already at --out.")] = False,
):
    """Optional stage: fine-tune the backbone with a new head (or train it from scratch), keep the
    best epoch by val accuracy (multi-label: val macro AP), and write a model directory that predict and compare
    accept."""
    from pipeline.runtime import distributed
    if nproc > 1:
        sys.exit(distributed.launch(nproc, distributed.without_option(sys.argv[1:], "--nproc")))
    preload("pipeline.tuning.training")
    model = api.finetune(data, out, force=force, quiet=quiet, checkpoint=checkpoint, resume=resume,
                         **keywords(settings))
    if model is None:   # a torchrun rank other than 0
        return
    m = model.metrics
    from pipeline.heads.metrics import headline
    _say([f"{settings.strategy}: {headline(m)} on {m['eval_split']} ({m['n_eval']} images), best epoch "
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
                                               "heads made of tensor operations: "
                                               + ", ".join(n for n, spec in CLASSIFIERS.items() if spec.to_torch)
                                               + ").")] = False,
    device: Annotated[Device, typer.Option(help=rule(device_setting()).doc)] = Device.auto,
    gradcam_class: Annotated[Optional[str], typer.Option(help="Grad-CAM of this class for every image (implies "
                                                              "--gradcam); default: each image's top-scoring "
                                                              "class.")] = None,
):
    """Show predictions on a grid of images (wrong ones in red) and, with --gradcam, where the model looked."""
    _check_model(model_dir)
    with heavy_imports():
        from pipeline.models.visualize import visualize as run
    gradcam = gradcam or gradcam_class is not None
    shown = run(model_dir, images, out, limit, gradcam, device.value, gradcam_class)
    _say([f"{shown['shown']} images, {shown['wrong']} wrong -> {out / 'predictions.png'}"]
         + ([f"Grad-CAM of the same {shown['shown']} images -> {out / 'gradcam.png'}"] if gradcam else []))


@app.command()
@settings_options(BenchSettings)
def bench(
    data: Annotated[Path, typer.Argument(help="Image folder (e.g. from benchmarks/make_images.py), in any "
                                              "layout extract takes.")],
    out: Annotated[Optional[Path], typer.Option(help="JSON file for the results.")] = None,
    settings: BenchSettings = None,
):
    """Images/s of the tutorial-style loop, of `pipeline extract` and of the model alone, side by side."""
    with heavy_imports():
        from pipeline.features.bench import bench as run
        from pipeline.features.bench import table, write_json
    results = run(data, settings, log=lambda line: typer.echo(line, err=True))
    typer.echo(table(results), nl=False)
    if out:
        write_json(results, out)


@app.command()
@settings_options(AuditSettings)
def audit(
    features: FeatureCachePath,
    out: Annotated[Path, typer.Option(help="Folder for the report: index.html, the CSVs, learning_curve.png "
                                           "and summary.json.")] = Path("reports/audit"),
    settings: AuditSettings = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines or summary.")] = False,
):
    """Check the data behind a cache: label issues (missing and wrong tags on a multi-label cache),
    near-duplicates and leaks between splits, outliers, and how accuracy (macro AP) grows with the number of
    labels; writes a report page and CSV files."""
    _check_cache(features)
    preload("pipeline.auditing.run", "pipeline.report.audit_page")
    result = api.audit(features, out, log=lambda line: _say([line], quiet), **keywords(settings))
    summary, page = result.summary, result.page
    tags = (f" ({summary['missing_tags']} missing, {summary['wrong_tags']} wrong tags)"
            if summary.get("multi_label") else "")
    _say([f"{summary['label_issues']} label issues{tags}, {summary['duplicate_groups']} near-duplicate groups "
          f"({summary['leak_groups']} across splits), {summary['outliers']} outliers in {summary['images']} "
          f"images -> {page}"], quiet)


@app.command()
@settings_options(SelectSettings)
def select(
    features: Annotated[Path, typer.Argument(help="Feature cache with an unlabelled pool (DATA/unlabeled/).")],
    out: Annotated[Path, typer.Option(help="CSV of the picks in the order to label them: path, strategy, score, "
                                           "cluster.")] = Path("picks.csv"),
    settings: SelectSettings = None,
    quiet: QuietSummary = False,
):
    """Pick the unlabelled images of the cache's pool to label next (move them into train/CLASS/, extract
    again: their vectors are reused)."""
    _check_cache(features)
    preload("pipeline.selection.run")
    rows = api.select(features, out, **keywords(settings))
    _say([f"{len(rows)} images to label, picked by {rows[0]['strategy']} -> {out}"], quiet)


def main() -> None:
    """The command line with run_stage's contract; a usage error (unknown option, missing argument, bad
    value) is one `error:` line and exit code 2 as well."""
    def run():
        try:
            code = app(standalone_mode=False, prog_name="pipeline")
        except typer.TyperException as exc:   # click's usage errors
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx else ""
            exit_with(getattr(exc, "exit_code", 2), f"error: {exc.format_message()}{hint}")
        if isinstance(code, int) and code:
            sys.exit(code)
    run_stage(run)
