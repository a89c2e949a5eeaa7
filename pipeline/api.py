"""The Python API, `import pipeline`: the command line's stages as functions, for notebooks and scripts.

    cache = pipeline.extract("images/", "features.h5", image_size=160)
    X, y = cache.arrays("train")
    model = pipeline.train(cache, "logreg")                     # or any scikit-learn classifier, with grid=
    model.predict(["new.jpg"])[0].labels
    pipeline.compare([model_a, "models/"])                      # saved models: paths or Model objects
    pipeline.audit(cache).label_issues

The settings are keywords named as in params.yaml (the command line's options without `--`). Bad input
raises `InputError` (a ValueError) with the line the command line prints, and nothing is written. Torch and
scikit-learn load on the first call that needs them, not on `import pipeline`."""
from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from pipeline.runtime.errors import InputError
from pipeline.runtime.reading import Field, read_json
from pipeline.runtime.settings import fields, validate


def _settings(cls, given: dict, function: str):
    """Settings `cls` from keywords, each checked; an unknown keyword is refused with the allowed ones."""
    allowed = [f.name for f in fields(cls)]
    unknown = [key for key in given if key not in allowed]
    if unknown:
        raise InputError(f"{unknown[0]} is not a setting of pipeline.{function}; allowed: {', '.join(allowed)}")
    paths_as_text = {key: os.fspath(value) if isinstance(value, os.PathLike) else value for key, value in given.items()}
    return validate(cls(**paths_as_text))


@dataclass(frozen=True)
class Summary:
    """What an extraction did: vectors computed by the backbone, reused from the previous cache, files skipped."""
    computed: int
    reused: int
    skipped: int
    seconds: float
    device: str
    skipped_files: list[tuple[str, str]] = field(repr=False)   # (path, reason)
    lines: list[str] = field(repr=False)                       # as `pipeline extract` prints them


class FeatureCache:
    """A feature cache file, checked as `train` checks it when opened; each read is checked again."""

    def __init__(self, path, summary: Summary | None = None):
        from pipeline.storage.cache import open_cache
        self.path, self.summary = Path(path), summary
        with open_cache(self.path) as cache:
            self.classes, self.splits, self.attrs = cache.classes, cache.splits, dict(cache.attrs)
            self.multi_label = cache.multi_label   # labels are [N, classes] 0/1 (docs/multilabel.md)
            self.layers = cache.layers
            self.rows = {split: int(cache.file[split]["labels"].shape[0]) for split in cache.splits}

    def _read(self, split: str, layer: str | None = None):
        from pipeline.storage.cache import open_cache
        if split not in self.splits:
            raise InputError(f"feature cache {self.path} has no split '{split}'; it has {', '.join(self.splits)}")
        with open_cache(self.path) as cache:
            return cache.read(split, layer)

    def arrays(self, split: str, layer: str | None = None):
        """(X, y) of a split: float32 vectors [N, D] (of `layer`, default the first) and int class indices
        into `classes`; in a multi-label cache, y is the [N, classes] 0/1 matrix."""
        rows = self._read(split, layer)
        return rows.features, rows.labels

    def paths(self, split: str) -> list[str]:
        """The image of each row of `split`, relative to the image folder (`attrs['data_root']`)."""
        return self._read(split).paths

    def __repr__(self) -> str:
        rows = ", ".join(f"{split} {n}" for split, n in self.rows.items())
        transform = json.loads(self.attrs["transform"])   # its form checked when the cache was opened
        made = f"{self.attrs.get('backbone')} {transform.get('image_size', '?')}px"
        return f"FeatureCache('{self.path}': {len(self.classes)} classes, rows {rows}; {made}, layers {self.layers})"


def extract(data, out, *, force: bool = False, quiet: bool = False, **settings) -> FeatureCache | None:
    """Stage one: the vectors of every image under `data` into the cache `out` (settings: those of
    `pipeline extract`, e.g. backbone=, image_size=, labels=). Vectors of unchanged images are reused from
    the cache already at `out`. `force` replaces an `out` that is not a feature cache. Under torchrun, each
    rank extracts a shard and rank 0 returns the cache (the others None)."""
    from pipeline.features.settings import ExtractSettings
    s = _settings(ExtractSettings, settings, "extract")
    from pipeline.features import extract as single, sharded
    from pipeline.runtime import distributed
    run = sharded.extract_folder if distributed.is_distributed() else single.extract_folder
    done = run(Path(data), Path(out), s, quiet, force)
    if done is None:
        return None
    summary = Summary(done.computed, done.reused, len(done.skipped), done.seconds, done.device, done.skipped,
                      done.lines())
    return FeatureCache(out, summary)


def open_cache(path) -> FeatureCache:
    """The feature cache at `path`, refused (InputError) when missing, damaged or of another version."""
    return FeatureCache(path)


@dataclass(frozen=True)
class Prediction:
    """The top classes of one image, best first, or why it was skipped (`labels` and `scores` empty)."""
    path: str
    labels: list[str]
    scores: list[float]
    score_kind: str = "probabilities"   # or "decision values", which are not probabilities
    skipped: str | None = None
    familiar: bool | None = None        # like the training images (None: the model keeps none to compare)
    novelty: float | None = None        # mean cosine distance to the nearest training vectors
    tags: dict[str, float] | None = None   # multi-label models: each class whose score reaches its threshold

    def __repr__(self) -> str:
        if self.skipped:
            return f"Prediction('{self.path}': skipped, {self.skipped})"
        top = ", ".join(f"{label} {score:.3f}" for label, score in zip(self.labels, self.scores))
        kind = "" if self.score_kind == "probabilities" else f" ({self.score_kind})"
        return f"Prediction('{self.path}': {top}{kind})"


class Model:
    """A trained model: a model directory (`load_model`), or a head trained with `out=None`, kept in memory
    until `save`. `metrics` is the dict of metrics.json."""

    def __init__(self, path=None, trained=None):
        from pipeline.storage import modeldir
        self._trained = trained
        if trained is not None:
            self.path, self.info = None, trained.info
            self.metrics = {k: v for k, v in trained.metrics.items() if k not in modeldir.DETAILS}
            return
        self.path, self.info = Path(path), modeldir.verify(path)
        self.metrics = read_json(self.path / "metrics.json", Field(dict))

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]

    @property
    def multi_label(self) -> bool:
        """Whether it names several labels per image (trained on a multi-label cache; docs/multilabel.md)."""
        return bool(self.info.get("multi_label"))

    @property
    def thresholds(self) -> dict[str, float] | None:
        """A multi-label model's decision threshold of each class, tuned on val; None for single-label ones."""
        return self.info.get("thresholds")

    @cached_property
    def details(self) -> dict:
        """details.json: the chosen hyperparameters, the search that chose them, per-class precision and recall."""
        from pipeline.storage import modeldir
        if self._trained is not None:
            return {k: self._trained.metrics[k] for k in modeldir.DETAILS if k in self._trained.metrics}
        return read_json(self.path / "details.json", Field(dict))

    @property
    def approach(self) -> str:
        """The classifier's name, or the fine-tuning strategy."""
        return self.info.get("classifier") or self.info.get("strategy")

    @cached_property
    def _directory(self):
        """The model as pipeline.models.directory runs it."""
        from pipeline.models.directory import FeatureModel, open_model
        if self._trained is None:
            return open_model(self.path)
        model = FeatureModel(Path("(not saved)"), self.info)
        model.model, model.familiarity = self._trained.model, self._trained.familiarity
        return model

    @property
    def score_kind(self) -> str:
        """"probabilities", or "decision values" for a head without predict_proba."""
        return self._directory.scores

    def predict(self, images, top_k: int = 5, device: str = "auto", engine: str = "auto",
                log=None) -> list[Prediction]:
        """The `top_k` classes of each image file, and of each image in the folders given (a path or a list);
        a file that is not a readable image is listed with the reason it was skipped. `log` receives a line
        naming the device and engine that run the backbone."""
        from pipeline.models.predict import predict_images
        inputs = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
        return [Prediction(r["path"], [t["class"] for t in r.get("top", [])], [t["score"] for t in r.get("top", [])],
                           r.get("scores", self.score_kind), r.get("error"), r.get("familiar"), r.get("novelty"),
                           {t["class"]: t["score"] for t in r["labels"]} if "labels" in r else None)
                for r in predict_images(self._directory, inputs, top_k, device, engine=engine, log=log)]

    def predict_features(self, X):
        """Scores [N, classes] of feature vectors from a cache made as this model's (columns: `classes`)."""
        import numpy as np
        from pipeline.heads.train import scores_of
        if self.info.get("kind") == "finetuned":
            raise InputError(f"{self.path} is a fine-tuned network: it scores images (predict), not feature vectors")
        scores = scores_of(self._directory.model, np.asarray(X, np.float32), len(self.classes))
        return self._directory.calibration.apply(scores) if self._directory.calibration else scores

    def save(self, out, force: bool = False) -> "Model":
        """Write the model directory of a model trained with `out=None` (replacing one at `out` only with
        `force`); this object then stands for it."""
        from pipeline.heads.train import save
        from pipeline.storage import modeldir
        if self._trained is None:
            raise InputError(f"{self.path} is already saved; copy the folder to keep another copy")
        modeldir.check_out(out, force)
        save(self._trained, Path(out))
        self.__init__(out)
        for cached in ("_directory", "details"):
            self.__dict__.pop(cached, None)
        return self

    def __repr__(self) -> str:
        where = f"'{self.path}'" if self.path else "not saved"
        from pipeline.heads.metrics import headline
        return (f"Model({where}: {self.approach}, {len(self.classes)} classes, {headline(self.metrics)} "
                f"on {self.metrics['eval_split']})")


def _train_settings(classifier, grid, settings: dict):
    """(TrainSettings, the head to fit): a zoo classifier with its own settings and tuned value (C=...), or
    a scikit-learn estimator with the grid to tune it over."""
    from dataclasses import replace
    from pipeline.heads.settings import TrainSettings, with_params
    common = {k: v for k, v in settings.items() if k in {f.name for f in fields(TrainSettings)} - {"classifier"}}
    own = {k: v for k, v in settings.items() if k not in common}
    if isinstance(classifier, str):
        if grid is not None:
            raise InputError(f"grid= tunes a scikit-learn estimator; {classifier} searches its own grid "
                             f"(fix its value with a keyword instead, e.g. C=1.0)")
        s = _settings(TrainSettings, {"classifier": classifier, **common}, "train")
        return with_params(s, own, str), None
    if own:
        raise InputError(f"{next(iter(own))} is not a setting of pipeline.train with a scikit-learn estimator; "
                         f"allowed: {', '.join(_common_keys())} (set the estimator's own parameters on it)")
    from pipeline.heads.estimator import EstimatorHead
    head = EstimatorHead(classifier, grid)
    return replace(_settings(TrainSettings, common, "train"), classifier=head.name), head


def _common_keys() -> list[str]:
    from pipeline.heads.settings import TrainSettings
    return [f.name for f in fields(TrainSettings) if f.name != "classifier"]


def train(cache, classifier="logreg", out=None, grid: dict | None = None, *, force: bool = False,
          expect: dict | None = None, **settings) -> Model:
    """Stage two: fit `classifier` on a feature cache (a FeatureCache or its path), choosing its
    hyperparameter on val, refitted and evaluated once on test (k-fold on train without a test split).
    `classifier` is a name of the zoo (settings as params.yaml's `train.NAME`: C=, preprocess=, ...) or a
    scikit-learn classifier instance, tuned over `grid` ({"alpha": [0.1, 1, 10]}). `out`: the model
    directory to write (replacing one only with `force`); None keeps the model in memory (`Model.save`).
    `expect` ({field: value}) refuses a cache made otherwise."""
    path = cache.path if isinstance(cache, FeatureCache) else Path(cache)
    s, head = _train_settings(classifier, grid, settings)
    from pipeline.heads import stored
    from pipeline.storage import modeldir
    if out is not None:
        modeldir.check_out(out, force)
        stored.check_storable(s.classifier)
    from pipeline.heads.classifiers import import_libraries
    from pipeline.heads.train import fit_head
    if head is None:
        import_libraries(s.classifier)
    model = Model(trained=fit_head(path, s, expect, head))
    return model.save(out, force) if out is not None else model


def load_model(path) -> Model:
    """The model directory at `path` (either kind: a head on cached features, or a fine-tuned network), its
    files checked against the SHA-256 digests in its model.json."""
    return Model(path)


def compare(models, out=None) -> list[dict]:
    """The rows of compare.json for saved models (Model objects, model directories or folders of them), best
    selection score first, exactly one `selected`; with `out`, also compare.md, compare.json and compare.png
    written there."""
    from pipeline.report import compare as report
    dirs = []
    for m in models:
        if isinstance(m, Model) and m.path is None:
            raise InputError("a model trained with out=None cannot be compared before it is saved (Model.save)")
        dirs.append(m.path if isinstance(m, Model) else Path(m))
    if out is not None:
        return report.compare(dirs, Path(out))
    if not dirs:
        raise InputError("compare needs at least one model directory")
    return report.rows(dirs)


@dataclass
class AuditResult:
    """The findings of `audit`: rows with the columns of its CSV files, and summary.json."""
    label_issues: list[dict] = field(repr=False)
    duplicates: list[dict] = field(repr=False)
    outliers: list[dict] = field(repr=False)
    learning_curve: list[dict] = field(repr=False)
    summary: dict = field(repr=False)
    page: Path | None = None          # index.html, when written (`out`)

    def __repr__(self) -> str:
        s = self.summary
        return (f"AuditResult({s['images']} images: {s['label_issues']} label issues, {s['duplicate_groups']} "
                f"near-duplicate groups ({s['leak_groups']} across splits), {s['outliers']} outliers"
                f"{f'; {self.page}' if self.page else ''})")


def audit(cache, out=None, *, log=None, **settings) -> AuditResult:
    """Check the data behind a feature cache (a FeatureCache or its path): label issues, near-duplicates and
    leaks between splits, outliers, the learning curve (settings: those of `pipeline audit`). With `out`,
    the report (index.html, the CSV files, summary.json) is written there."""
    from pipeline.auditing.settings import AuditSettings
    s = _settings(AuditSettings, settings, "audit")
    path = cache.path if isinstance(cache, FeatureCache) else Path(cache)
    from pipeline.auditing.run import audit as run
    from pipeline.report.audit_page import write_page
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(out) if out is not None else Path(scratch) / "report"
        summary = run(path, folder, s, log=log or (lambda line: None), page=write_page if out is not None else None)
        page = folder / "index.html" if out is not None else None
        tables = {name: _rows(folder / f"{name}.csv")
                  for name in ("label_issues", "duplicates", "outliers", "learning_curve")}
    return AuditResult(**tables, summary=summary, page=page)


def select(cache, out=None, **settings) -> list[dict]:
    """The images of a feature cache's unlabelled pool (a FeatureCache or its path) to label next, in that
    order: the rows of picks.csv (path, strategy, score, cluster); with `out`, also written there as CSV
    (settings: those of `pipeline select`, e.g. budget=, strategy=)."""
    from pipeline.selection.settings import SelectSettings
    s = _settings(SelectSettings, settings, "select")
    from pipeline.selection.run import check_out, select as run, write_picks
    if out is not None:
        check_out(Path(out))
    rows = run(cache.path if isinstance(cache, FeatureCache) else Path(cache), s)
    if out is not None:
        write_picks(rows, Path(out))
    return rows


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:   # paths as the cache keeps them
        return list(csv.DictReader(f))


def finetune(data, out, *, force: bool = False, quiet: bool = False, checkpoint: bool = False, resume=None,
             **settings) -> Model | None:
    """Fine-tune a backbone with a new head (or train it from scratch) on an image folder and write the model
    directory `out` (settings: those of `pipeline finetune`, e.g. strategy=, epochs=). `checkpoint` rewrites
    OUT/checkpoint.safetensors after every epoch; `resume` carries on from one. Under torchrun rank 0 returns the
    model, the others None."""
    from pipeline.tuning.settings import FinetuneSettings
    s = _settings(FinetuneSettings, settings, "finetune")
    from pipeline.tuning.training import finetune as run
    metrics = run(Path(data), Path(out), s, quiet, checkpoint, resume, force)
    return None if metrics is None else Model(out)
