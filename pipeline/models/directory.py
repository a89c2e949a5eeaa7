"""A trained model directory as one object, one class per kind; callers never ask which kind they hold.

  FeatureModel    a classifier on cached features (`pipeline train`): the backbone recorded in model.json,
                  then head.safetensors (arrays and JSON)
  EstimatorModel  a scikit-learn estimator of the Python API on cached features: head.skops
  FinetunedModel  a fine-tuned network (`pipeline finetune`): weights.safetensors

Each gives its classes, image preprocessing and backbone spec, a scorer for batches of images (its scores
calibrated where model.json records a calibration, and the images' novelty where it records training
vectors), and itself as one torch network from images to scores (for export and Grad-CAM). `open_model`
checks the files against their SHA-256 first (pipeline.storage.modeldir) and reads the model file only when
it is needed.
"""
from __future__ import annotations

from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from pipeline.features.backbones.loading import Backbone
from pipeline.features.spec import BackboneSpec, Preprocessing
from pipeline.runtime.errors import InputError
from pipeline.runtime.reading import Field, read_json
from pipeline.storage import modeldir
from pipeline.storage.cache import check_trained_on

PROBABILITIES = "probabilities"
Scorer = Callable[[torch.Tensor], np.ndarray]   # normalised images [N, 3, H, W] -> scores [N, classes]


class Network(NamedTuple):
    module: nn.Module        # images -> the scores `pipeline predict` ranks, in eval mode, on the CPU
    feature_layer: nn.Module | None   # the module whose input is the spatial map Grad-CAM weighs (None:
                                      # the features are a transformer's tokens, not a module's output)


class ModelDirectory:
    kind: ClassVar[modeldir.Kind]
    what: ClassVar[str]          # the kind in a few words, for a legend

    def __init__(self, path: Path, info: dict):
        self.path, self.info = Path(path), info

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]

    @cached_property
    def backbone_spec(self) -> BackboneSpec:
        try:
            return BackboneSpec.from_dict(self.info["backbone"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{self.path / modeldir.INFO}: the backbone spec is malformed ({exc!r})")

    @property
    def preprocessing(self) -> Preprocessing:
        """The images' recipe: resize, centre crop, normalise."""
        return self.backbone_spec.preprocessing

    @property
    def approach(self) -> str:
        """The classifier's name or the fine-tuning strategy."""
        raise NotImplementedError

    @property
    def scores(self) -> str:
        """What its scores are: "probabilities", or "decision values" (e.g. a linear SVM's), which are not."""
        raise NotImplementedError

    @property
    def cache_fingerprint(self) -> str | None:
        """The feature cache the model was trained on; None for a model trained on images."""
        return None

    @cached_property
    def metrics(self) -> dict:
        """metrics.json: the evaluation and the seconds the model took."""
        path = self.path / "metrics.json"
        if not path.is_file():
            raise InputError(f"model directory {self.path} has no metrics.json")
        return read_json(path, Field(dict))

    @cached_property
    def model(self):
        """The model file's content, read (after `open_model`'s SHA-256 checks) on first use and checked."""
        model = self._built(modeldir.read_model(self.path, self.kind))
        self._check(model)
        return model

    def _built(self, content):
        """The model from the content of its file."""
        return content

    def _check(self, model) -> None:
        raise NotImplementedError

    def scorer(self, device: torch.device, engine: str = "auto", log: Callable[[str], None] | None = None) -> Scorer:
        """Scores of batches of images on `device`; the backbone of a classifier on cached features runs on
        `engine` (auto, torch, onnxruntime) and `log` receives a line naming it, and notes."""
        assess = self._assessor(device, engine, log, novelty=False)
        return lambda x: assess(x)[0]

    def assessor(self, device: torch.device, engine: str = "auto", log: Callable[[str], None] | None = None):
        """As `scorer`, giving (scores, novelty): each image's novelty (pipeline.heads.familiarity), or None
        where the model records no training vectors to compare with."""
        return self._assessor(device, engine, log, novelty=True)

    def _assessor(self, device: torch.device, engine: str, log, novelty: bool):
        raise NotImplementedError

    def network(self) -> Network:
        raise NotImplementedError

    @cached_property
    def thresholds(self) -> np.ndarray | None:
        """A multi-label model's decision threshold of each class (model.json `thresholds`), in class order."""
        recorded = self.info.get("thresholds")
        if recorded is None:
            return None
        try:
            return np.array([float(recorded[c]) for c in self.classes])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{self.path / modeldir.INFO}: 'thresholds' must give each class a number ({exc!r})")

    @cached_property
    def calibration(self):
        """The calibration model.json records (pipeline.heads.calibration: a Temperature, or for a multi-label
        model ClassPlatt or ClassTemperatures), or None."""
        from pipeline.heads.calibration import recorded
        try:
            return recorded(self.info.get("calibration"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{self.path / modeldir.INFO}: 'calibration' is malformed ({exc!r})")

    @cached_property
    def familiarity(self):
        """The training vectors new images are compared with (pipeline.heads.familiarity), or None."""
        from pipeline.heads.familiarity import Familiarity
        recorded = self.info.get("familiarity")
        try:
            return Familiarity.load(self.path, recorded) if recorded else None
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise InputError(f"{self.path}: the familiarity record cannot be read ({exc!r})")

    @property
    def novelty_threshold(self) -> float | None:
        """The novelty above which an image counts as unfamiliar; None where there is none."""
        return self.familiarity.threshold if self.familiarity else None


class FeatureModel(ModelDirectory):
    kind = modeldir.FEATURES
    what = "feature cache + classifier (extraction included)"

    @property
    def approach(self) -> str:
        return self.info.get("classifier", "this")

    @property
    def scores(self) -> str:
        """Calibrated scores are probabilities, whatever the head's own are."""
        from pipeline.heads.classifiers import has_probabilities
        return PROBABILITIES if self.calibration or has_probabilities(self.model[-1]) else "decision values"

    @property
    def cache_fingerprint(self) -> str | None:
        return self.info["fingerprint"]

    def _built(self, content):
        """The fitted preprocessing + head from its arrays and settings (pipeline.heads.stored)."""
        from pipeline.heads.stored import restored
        try:
            return restored(*content)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:   # RuntimeError: torch's
            raise InputError(f"{self.path / self.kind.model_file} cannot be read as a features model: "
                            f"{' '.join(str(exc).split())[:200] or type(exc).__name__}")

    def _check(self, model) -> None:
        path = self.path / self.kind.model_file
        if not hasattr(model, "steps") or len(model.steps) < 2 or not hasattr(model[-1], "classes_"):
            raise InputError(f"{path} holds a {type(model).__name__}, not a fitted preprocessing + classifier")
        seen = np.asarray(model[-1].classes_)
        if seen.dtype.kind not in "iu" or seen.min() < 0 or seen.max() >= len(self.classes):
            raise InputError(f"{path} predicts class indices {seen.min()}..{seen.max()} but "
                            f"{self.path / modeldir.INFO} lists {len(self.classes)} classes")

    def backbone(self) -> Backbone:
        """The backbone recorded in model.json, refusing weights other than those it was trained on."""
        from pipeline.features.backbones.loading import recorded_backbone
        spec = self.backbone_spec
        check_trained_on(self.info.get("cache"), spec, self.info["fingerprint"], str(self.path / modeldir.INFO))
        backbone = recorded_backbone(spec)
        if backbone.weights_sha256 != spec.weights_sha256:
            raise InputError(f"weights {spec.weights} differ from those the model {self.path} was trained on "
                            f"(SHA-256 {backbone.weights_sha256[:12]} != {spec.weights_sha256[:12]})")
        return replace(backbone, preprocessing=spec.preprocessing)

    def _assessor(self, device: torch.device, engine: str, log, novelty: bool):
        from pipeline.features.engines.onnx_runtime import embedder
        from pipeline.heads.train import scores_of
        backbone, head, n = self.backbone(), self.model, len(self.classes)
        calibration, familiarity = self.calibration, self.familiarity if novelty else None
        embed, engine, notes = embedder(backbone, device, engine)
        for line in [f"predict: {device}, {engine}", *notes] if log else []:
            log(line)

        def assess(x):
            features = embed(x)[backbone.layer]
            scores = scores_of(head, features, n)
            return (calibration.apply(scores) if calibration else scores,
                    familiarity.novelty(head[0].transform(features)) if familiarity else None)
        return assess

    def network(self) -> Network:
        """Backbone + feature preprocessing + head in torch (the scores `scorer` gives); refused for heads that
        are not tensor operations (pipeline.heads.classifiers: their spec has no `to_torch`)."""
        from pipeline.models.networks import ImageClassifier, head_module
        head = head_module(self.model, len(self.classes), self.approach)
        if self.calibration:
            head = nn.Sequential(head, self.calibration.torch_layer())
        backbone = self.backbone()
        backbone.model.cpu()
        net = ImageClassifier(backbone, head).eval()
        return Network(net, dict(net.model.named_modules()).get(backbone.layer))


class EstimatorModel(FeatureModel):
    kind = modeldir.ESTIMATOR
    what = "feature cache + scikit-learn estimator (extraction included)"

    def _built(self, content):
        return content   # skops rebuilt it, from trusted types only


class FinetunedModel(ModelDirectory):
    kind = modeldir.FINETUNED
    what = "fine-tune"
    scores = PROBABILITIES      # a softmax over its logits, divided by the temperature where there is one;
                                # multi-label (model.json `multi_label`): each class's sigmoid, calibrated per
                                # class (Platt scaling or a temperature) where model.json records it

    @property
    def approach(self) -> str:
        return self.info.get("strategy", "finetuned")

    def _check(self, model) -> None:
        if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
            raise InputError(f"{self.path / self.kind.model_file} is not a state dict of tensors")

    @cached_property
    def _classifier(self) -> nn.Module:
        """The fine-tuned network (logits), rebuilt from model.json and its weights."""
        from pipeline.tuning.training import network
        try:
            return network(self.info, self.model)
        except RuntimeError as exc:   # load_state_dict: missing or unexpected keys, other shapes
            raise InputError(f"{self.path / self.kind.model_file} does not fit the network "
                            f"{self.path / modeldir.INFO} describes ({len(self.classes)} classes): "
                            f"{' '.join(str(exc).split())[:300]}")

    @property
    def _softmax(self):
        """The temperature model.json records, or 1 (the plain softmax of the logits)."""
        from pipeline.heads.calibration import Temperature
        return self.calibration or Temperature(1.0, "decision values")

    def _label_scores(self, logits: np.ndarray) -> np.ndarray:
        from scipy.special import expit
        return self.calibration.apply(expit(logits)) if self.calibration else expit(logits)

    def _assessor(self, device: torch.device, engine: str, log, novelty: bool):
        net = self._classifier.to(device)   # the fine-tuned network runs in torch
        scores = self._label_scores if self.info.get("multi_label") else self._softmax.apply
        familiarity = self.familiarity if novelty else None

        def assess(x):
            features = net.features(x.to(device))
            logits = net.head(features).float().cpu().numpy()
            return scores(logits), familiarity.novelty(features.float().cpu().numpy()) if familiarity else None
        return assess

    def network(self) -> Network:
        layer = self.backbone_spec.layer
        scores = ([nn.Sigmoid(), *([self.calibration.torch_layer()] if self.calibration else [])]
                  if self.info.get("multi_label") else [self._softmax.torch_layer()])
        net = nn.Sequential(self._classifier.cpu(), *scores).eval()
        return Network(net, dict(self._classifier.backbone.named_modules()).get(layer))


KINDS = {cls.kind.name: cls for cls in (FeatureModel, EstimatorModel, FinetunedModel)}


def open_model(path: Path) -> ModelDirectory:
    """The model directory at `path`, its files checked against the SHA-256 digests in its model.json."""
    info = modeldir.verify(path)
    return KINDS[info["kind"]](path, info)
