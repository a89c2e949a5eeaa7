"""The settings of stage two (kept free of torch and sklearn, for a quick command line). The classifiers, each
with its tuned hyperparameter, grid and own settings, are the modules of pipeline.heads.classifiers."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from pipeline.heads.classifiers import CLASSIFIERS
from pipeline.runtime.errors import InputError, quote
from pipeline.runtime.settings import check_value, fields, from_mapping, key_name, setting


PREPROCESSING = ("l2", "standardize", "none")
CALIBRATION = ("temperature", "none")


@dataclass(kw_only=True)
class TrustSettings:
    """The calibration and familiarity of a trained model: settings of `pipeline train` and `pipeline finetune`
    (keyword-only: the settings that take them keep their constructors' positional arguments)."""
    calibration: str = setting("temperature", "Calibrate the scores with one temperature fitted on held-out "
                               "scores, or keep the model's own.", choices=CALIBRATION)
    novelty_quantile: float = setting(0.95, "Share of the val images that count as familiar: sets the novelty "
                                      "threshold of predict.", above=0, below=1)


@dataclass
class TrainSettings(TrustSettings):
    """Stage two: params.yaml `train.<classifier>` and the options of `pipeline train`. The tuned value and
    the classifier's own settings (`params`) depend on the classifier: see `with_params`."""
    classifier: str = setting("logreg", "The classifier to fit.", choices=tuple(CLASSIFIERS))
    value: float | str = "auto"          # the tuned hyperparameter, or "auto" to search for it
    params: dict = field(default_factory=dict)
    preprocess: str = setting("l2", "Feature preprocessing, fitted on the training rows.", choices=PREPROCESSING)
    class_weight: str | None = setting(None, "'balanced' to reweight rare classes.", choices=("balanced",))
    cv_folds: int = setting(5, "Folds for selection when the cache has no test split.", min=2, max=100)
    seed: int = setting(0, "Seed of the folds and of the classifier.")


def own_keys(classifier: str) -> tuple[str, ...]:
    """The tuned hyperparameter and the settings only this classifier has (not those of TrainSettings)."""
    spec = CLASSIFIERS[classifier]
    common = {f.name for f in fields(TrainSettings)}
    return (spec.tuned, *(key for key in spec.params if key not in common))


def with_params(s: TrainSettings, raw: dict, label) -> TrainSettings:
    """`s` with its tuned value and its classifier's own settings from `raw` (params.yaml keys or --param
    pairs), each checked; `label(key)` names a key in messages."""
    spec = CLASSIFIERS[s.classifier]
    tuned, *own = own_keys(s.classifier)
    for key in raw:
        if key not in (tuned, *own):
            raise InputError(f"{label(key_name(key))} is not a setting of {s.classifier}; "
                            f"allowed: {', '.join((tuned, *own))}")
    value = check_value(label(tuned), raw.get(tuned, "auto"), *spec.tuned_rule)
    params = {key: check_value(label(key), raw[key], *spec.params[key]) for key in own if key in raw}
    return replace(s, value=value, params=params)


def train_settings(name: str, raw: dict | None) -> TrainSettings:
    """The settings of params.yaml `train.<name>`: the key names the classifier."""
    if name not in CLASSIFIERS:
        raise InputError(f"params.yaml: train.{name}: unknown classifier '{name}'; "
                        f"choose one of: {', '.join(CLASSIFIERS)}")
    raw = raw or {}
    if not isinstance(raw, dict):
        raise InputError(f"params.yaml: train.{name} must be a mapping of settings, got {quote(raw)}")
    common = [f.name for f in fields(TrainSettings) if f.name != "classifier"]
    spec = CLASSIFIERS[name]
    allowed = list(dict.fromkeys((spec.tuned, *common, *spec.params)))
    for key in raw:
        if key not in allowed:
            raise InputError(f"params.yaml: train.{name}.{key_name(key)} is not a "
                            f"setting of {name}; allowed: {', '.join(allowed)}")
    s = from_mapping(TrainSettings, {"classifier": name, **{k: v for k, v in raw.items() if k in common}},
                     f"train.{name}")
    return with_params(s, {k: v for k, v in raw.items() if k not in common},
                       lambda key: f"params.yaml: train.{name}.{key}")


