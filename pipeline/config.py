"""params.yaml -> typed, validated settings; each bad key gets one message naming it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.features.backbones import REGISTRY, available
from pipeline.heads.classifiers import CLASSIFIERS
from pipeline.heads.train import PREPROCESSING, TrainSettings
from pipeline.runtime.errors import UserError


@dataclass
class ExtractParams:
    labels: str | None = None
    id_column: str = "id"
    label_column: str | None = None
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    layer: str | list[str] | None = None
    image_size: int | None = None
    compute_stats: bool = False
    tta: bool = False
    batch_size: int | None = None
    device: str = "auto"
    dtype: str = "float16"
    workers: int | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    reuse: bool = True


CHOICES = {"device": ("auto", "cpu", "cuda"), "dtype": ("float16", "float32")}


def read_params(path: Path, section: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}")
    if not isinstance(raw.get(section, {}), dict):
        raise UserError(f"{path}: '{section}' must be a mapping")
    return raw.get(section) or {}


def _check_type(key: str, value, annotation: str):
    kinds = {"int": int, "float": (int, float), "str": str}
    wanted = [t.strip() for t in annotation.split("|")]
    if value is None and "None" in wanted or "bool" in wanted and isinstance(value, bool):
        return value
    if isinstance(value, bool):
        if "bool" in wanted:
            return value
    elif isinstance(value, list):
        if "list[str]" in wanted and value and all(isinstance(v, str) for v in value):
            return value
    else:
        for t in wanted:
            if t in kinds and isinstance(value, kinds[t]):
                return float(value) if t == "float" else value
    raise UserError(f"params.yaml: {key} must be {' or '.join(wanted)}, got {value!r}")


def _settings(cls, section: str, raw: dict, choices: dict):
    """Dataclass `cls` from a params section, each value checked against its annotation and choices."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise UserError(f"params.yaml: {section}.{key} is not a setting; allowed: {', '.join(fields)}")
        values[key] = _check_type(f"{section}.{key}", value, fields[key].type)
        if key in choices and value not in choices[key]:
            raise UserError(f"params.yaml: {section}.{key} must be one of {', '.join(choices[key])}, "
                            f"got {value!r}")
        if key == "backbone" and value not in REGISTRY and not value.startswith("timm/"):
            raise UserError(f"params.yaml: {section}.backbone '{value}' is unknown; choose one of: "
                            f"{', '.join(available())}")
    return cls(**values)


def extract_params(raw: dict) -> ExtractParams:
    return _settings(ExtractParams, "extract", raw, CHOICES)


def extractor_params(path: Path, name: str) -> ExtractParams:
    """Extractor `name` of an extractor sweep: the `extract` section with `extractors.NAME` on top."""
    extractors = read_params(path, "extractors")
    if name not in extractors:
        raise UserError(f"{path}: extractors has no '{name}'; it has: {', '.join(extractors) or 'none'}")
    own = extractors[name] or {}
    if not isinstance(own, dict):
        raise UserError(f"{path}: extractors.{name} must be a mapping of extract settings, got {own!r}")
    base = extract_params(read_params(path, "extract"))
    checked = _settings(ExtractParams, f"extractors.{name}", own, CHOICES)
    return dataclasses.replace(base, **{key: getattr(checked, key) for key in own})


def finetune_settings(name: str, raw: dict | None):
    """One run of the `finetune` section: its key names the model directory, its values the settings."""
    from pipeline.finetune.training import CHOICES as FINETUNE_CHOICES
    from pipeline.finetune.training import FinetuneSettings
    return _settings(FinetuneSettings, f"finetune.{name}", raw or {}, FINETUNE_CHOICES)


def train_settings(name: str, raw: dict | None, where: str | None = None) -> TrainSettings:
    """One classifier's settings; `where` names their origin in messages (default: params.yaml)."""
    where = where or f"params.yaml: train.{name}"
    if name not in CLASSIFIERS:
        raise UserError(f"{where}: unknown classifier '{name}'; choose one of: {', '.join(CLASSIFIERS)}")
    raw = dict(raw or {})
    spec = CLASSIFIERS[name]
    value = raw.pop(spec.tuned, "auto")
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UserError(f"{where}: {spec.tuned} must be a number or 'auto', got {value!r}")
    if value != "auto" and (value < 0 or value == 0 and spec.tuned != "weight_decay"):
        raise UserError(f"{where}: {spec.tuned} must be {'at least 0' if spec.tuned == 'weight_decay' else 'above 0'}, "
                        f"got {value!r}")
    s = TrainSettings(name, value)
    for key in ("preprocess", "class_weight", "cv_folds", "seed"):
        if key in raw:
            setattr(s, key, raw.pop(key))
    if not isinstance(s.cv_folds, int) or s.cv_folds < 2:
        raise UserError(f"{where}: cv_folds must be at least 2, got {s.cv_folds!r}")
    if s.preprocess not in PREPROCESSING:
        raise UserError(f"{where}: preprocess must be one of {', '.join(PREPROCESSING)}, got {s.preprocess!r}")
    unknown = set(raw) - set(spec.params)
    if unknown:
        raise UserError(f"{where}: {sorted(unknown)[0]} is not a setting of {name}; allowed: "
                        f"{', '.join((spec.tuned, 'preprocess', 'class_weight', 'cv_folds', 'seed', *spec.params))}")
    s.params = raw
    return s
