"""Calibrated scores: one temperature fitted on held-out scores (Guo et al., ICML 2017), and how far a
head's confidence is from its accuracy (expected calibration error over a reliability table).

A temperature divides the head's logits (log-probabilities, or decision values for heads without
probabilities) before the softmax: it rescales confidence and never changes the top-1 class. A multi-label
head gets one temperature per class (`ClassTemperatures`), each a two-class calibration of that class's score,
or (the default, `method`) per-class Platt scaling (`ClassPlatt`: a slope and an offset per class, Platt 1999),
and its ECE is the mean over classes of each class's one-vs-rest ECE (`assess_multilabel`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pipeline.runtime.errors import InputError

BINS = 15                 # of the reliability table, as in Guo et al.
FLOOR = 1e-6


def logits(scores: np.ndarray, probabilities: bool, floor: float = FLOOR) -> np.ndarray:
    """The values a temperature divides: log-probabilities (clipped at `floor`), or the decision values
    themselves. Classes the head never saw (-inf decision values) stay impossible."""
    scores = np.asarray(scores, dtype=np.float64)
    if probabilities:
        return np.log(np.clip(scores, floor, 1.0))
    return np.where(np.isfinite(scores), scores, np.log(FLOOR) * 1e3)


def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    z = z / temperature
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of `y` under softmax(z / T), searched on a
    log scale between 1/100 and 100 (a convex problem in 1/T: the bounded search finds its minimum)."""
    from scipy.optimize import minimize_scalar
    z, y = np.asarray(z, dtype=np.float64), np.asarray(y)
    found = minimize_scalar(lambda log_t: _nll(z, y, np.exp(log_t)), bounds=(np.log(1e-2), np.log(1e2)),
                            method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def reliability(probabilities: np.ndarray, y: np.ndarray, bins: int = BINS) -> list[dict]:
    """One row per confidence bin of equal width: its range, how many images fall in it, their mean
    confidence (top-1 probability) and their accuracy. Empty bins are kept, with count 0."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == np.asarray(y)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                     "confidence": float(confidence[inside].mean()) if n else None,
                     "accuracy": float(correct[inside].mean()) if n else None})
    return rows


def expected_calibration_error(table: list[dict]) -> float:
    """The count-weighted mean gap between confidence and accuracy over the bins of `table`."""
    total = sum(row["count"] for row in table)
    return float(sum(row["count"] * abs(row["confidence"] - row["accuracy"])
                     for row in table if row["count"]) / total)


def reliability_png(table: list[dict], path, title: str) -> None:
    """The reliability diagram: accuracy per confidence bin against the diagonal of perfect calibration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    filled = [row for row in table if row["count"]]
    ax.bar([row["low"] for row in filled], [row["accuracy"] for row in filled], width=1 / len(table),
           align="edge", edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot([row["confidence"] for row in filled], [row["accuracy"] for row in filled], "o", color="black",
            markersize=3, label="mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 score)", ylabel="accuracy", title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass(frozen=True)
class Temperature:
    """A head's calibration: softmax(logits(scores) / value). `of`: what the head's own scores are
    ("probabilities" or "decision values"); `floor`: where its probabilities are clipped before the log
    (knn's vote fractions are mostly exact zeros and ones: a high floor smooths them)."""
    value: float
    of: str
    floor: float = FLOOR

    @classmethod
    def fit(cls, held_out: np.ndarray, y: np.ndarray, probabilities: bool, floor: float = FLOOR) -> "Temperature":
        """The temperature fitted on held-out scores and their labels."""
        z = logits(held_out, probabilities, floor)
        return cls(fit_temperature(z, y), "probabilities" if probabilities else "decision values", floor)

    def apply(self, scores: np.ndarray) -> np.ndarray:
        return softmax(logits(scores, self.of == "probabilities", self.floor), self.value)

    def to_dict(self) -> dict:
        return {"method": "temperature", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Temperature | None":
        """As model.json records it; ValueError for a value no fit gives."""
        if not d:
            return None
        found = cls(float(d["value"]), d["of"], float(d["floor"]))
        if not (0 < found.value < np.inf and 0 < found.floor < 1 and found.of in ("probabilities", "decision values")):
            raise ValueError(f"temperature {found.value}, floor {found.floor}, of {found.of!r}")
        return found

    def torch_layer(self):
        """The same in torch, after layers giving the head's own scores (for export and Grad-CAM)."""
        import torch

        temperature = self

        class Calibrated(torch.nn.Module):
            def forward(self, scores):
                z = (torch.log(scores.clamp(min=temperature.floor, max=1.0))
                     if temperature.of == "probabilities" else scores)
                return torch.softmax(z / temperature.value, 1)

        return Calibrated()


def two_classes(scores: np.ndarray, probabilities: bool) -> np.ndarray:
    """One class's scores [N] as the scores of the two classes "without it" and "with it" [N, 2]: (1 - p, p),
    or (0, d) for a decision value d. A Temperature on these is sigmoid(logit(p) / T), or sigmoid(d / T)."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.stack([1 - scores if probabilities else np.zeros_like(scores), scores], 1)


@dataclass(frozen=True)
class ClassTemperatures:
    """A multi-label head's calibration: one Temperature per class, each on the class's `two_classes` scores,
    fitted on held-out scores of that class alone. Calibrated scores are probabilities; a temperature keeps
    each class's order of images (its AP) and its neutral point (0.5, or a decision value of 0)."""
    values: tuple[float, ...]
    of: str
    floor: float = FLOOR

    @classmethod
    def fit(cls, held_out: np.ndarray, Y: np.ndarray, probabilities: bool,
            floor: float = FLOOR) -> "ClassTemperatures":
        """Each class's temperature fitted on held-out scores [N, classes] and their 0/1 labels; a class
        without both a positive and a negative there keeps 1."""
        fitted = [Temperature.fit(two_classes(held_out[:, c], probabilities), Y[:, c], probabilities, floor).value
                  if 0 < Y[:, c].sum() < len(Y) else 1.0 for c in range(Y.shape[1])]
        return cls(tuple(fitted), "probabilities" if probabilities else "decision values", floor)

    def apply(self, scores: np.ndarray) -> np.ndarray:
        probabilities = self.of == "probabilities"
        return np.stack([Temperature(t, self.of, self.floor).apply(two_classes(scores[:, c], probabilities))[:, 1]
                         for c, t in enumerate(self.values)], 1)

    def to_dict(self) -> dict:
        return {"method": "temperature per class", "values": list(self.values), "of": self.of, "floor": self.floor}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassTemperatures":
        """As model.json records it; ValueError for a value no fit gives."""
        found = cls(tuple(float(v) for v in d["values"]), d["of"], float(d["floor"]))
        for value in found.values:
            Temperature.from_dict({"value": value, "of": found.of, "floor": found.floor})
        return found

    def torch_layer(self):
        """The same in torch, after layers giving the head's own scores [N, classes]."""
        return class_sigmoid_layer([1 / t for t in self.values], [0.0] * len(self.values), self.of, self.floor)


def class_logits(scores: np.ndarray, probabilities: bool, floor: float = FLOOR) -> np.ndarray:
    """Each class's score [N, classes] as a logit: log(p) - log(1 - p), both clipped at `floor`, or the
    decision value itself."""
    scores = np.asarray(scores, dtype=np.float64)
    if not probabilities:
        return scores
    return np.log(np.clip(scores, floor, 1.0)) - np.log(np.clip(1 - scores, floor, 1.0))


@dataclass(frozen=True)
class ClassPlatt:
    """A multi-label head's calibration by per-class Platt scaling: sigmoid(slope * z + offset) of each class's
    `class_logits` z, a one-feature logistic regression fitted on held-out scores of that class alone. Unlike a
    temperature it moves the neutral point, which a one-vs-rest head trained on rare positives sets too high."""
    slopes: tuple[float, ...]
    offsets: tuple[float, ...]
    of: str
    floor: float = FLOOR

    C = 1e6   # practically unregularised: two parameters fitted on hundreds of held-out scores

    @classmethod
    def fit(cls, held_out: np.ndarray, Y: np.ndarray, probabilities: bool, floor: float = FLOOR) -> "ClassPlatt":
        """Each class's slope and offset fitted on held-out scores [N, classes] and their 0/1 labels; a class
        without both a positive and a negative there keeps its own scores (slope 1, offset 0)."""
        from sklearn.linear_model import LogisticRegression
        z = class_logits(held_out, probabilities, floor)
        fitted = [LogisticRegression(C=cls.C).fit(z[:, [c]], Y[:, c]) if 0 < Y[:, c].sum() < len(Y) else None
                  for c in range(Y.shape[1])]
        return cls(tuple(float(f.coef_[0, 0]) if f else 1.0 for f in fitted),
                   tuple(float(f.intercept_[0]) if f else 0.0 for f in fitted),
                   "probabilities" if probabilities else "decision values", floor)

    def apply(self, scores: np.ndarray) -> np.ndarray:
        from scipy.special import expit
        z = class_logits(scores, self.of == "probabilities", self.floor)
        return expit(z * np.array(self.slopes) + np.array(self.offsets))

    def to_dict(self) -> dict:
        return {"method": "platt per class", "slopes": list(self.slopes), "offsets": list(self.offsets),
                "of": self.of, "floor": self.floor}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassPlatt":
        """As model.json records it; ValueError for a value no fit gives."""
        found = cls(tuple(float(v) for v in d["slopes"]), tuple(float(v) for v in d["offsets"]), d["of"],
                    float(d["floor"]))
        if not (len(found.slopes) == len(found.offsets) and np.isfinite([*found.slopes, *found.offsets]).all()
                and 0 < found.floor < 1 and found.of in ("probabilities", "decision values")):
            raise ValueError(f"slopes {found.slopes}, offsets {found.offsets}, floor {found.floor}, of {found.of!r}")
        return found

    def torch_layer(self):
        """The same in torch, after layers giving the head's own scores [N, classes]."""
        return class_sigmoid_layer(self.slopes, self.offsets, self.of, self.floor)


def class_sigmoid_layer(slopes, offsets, of: str, floor: float):
    """A torch layer giving sigmoid(slope * z + offset) of each class's score z as `class_logits` makes it:
    per-class Platt scaling, or a temperature per class (slope 1/T, offset 0), in exported networks."""
    import torch

    class Calibrated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("slopes", torch.tensor(slopes, dtype=torch.float32))
            self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.float32))

        def forward(self, scores):
            if of == "probabilities":
                scores = torch.log(scores.clamp(min=floor, max=1.0)) - torch.log((1 - scores).clamp(min=floor, max=1.0))
            return torch.sigmoid(scores * self.slopes + self.offsets)

    return Calibrated()


def method(setting: str, multi_label: bool) -> str:
    """The calibration a `calibration` setting gives a head of that label kind: auto is one temperature for a
    single-label head and per-class Platt scaling for a multi-label one. Per-class Platt scaling has no
    single-label form that keeps the softmax's classes summing to one: refused there."""
    if setting == "auto":
        return "platt" if multi_label else "temperature"
    if setting == "platt" and not multi_label:
        raise InputError("calibration 'platt' is per class, for a multi-label cache; a single-label head takes "
                         "auto, temperature or none")
    return setting


def fitted(setting: str, multi_label: bool, held_out: np.ndarray, labels: np.ndarray, probabilities: bool,
           floor: float = FLOOR):
    """The calibration (`method`) fitted on held-out scores and their labels (a class index per image, or a
    0/1 matrix): a Temperature, ClassTemperatures, ClassPlatt, or None for none."""
    chosen = method(setting, multi_label)
    if chosen == "none":
        return None
    kind = ClassPlatt if chosen == "platt" else ClassTemperatures if multi_label else Temperature
    return kind.fit(held_out, labels, probabilities, floor)


def recorded(d: dict | None):
    """The calibration model.json records: a Temperature, ClassTemperatures, ClassPlatt (`method`), or None."""
    if not d:
        return None
    kinds = {"temperature per class": ClassTemperatures, "platt per class": ClassPlatt}
    return kinds.get(d.get("method"), Temperature).from_dict(d)


def uncalibrated(scores: np.ndarray, probabilities: bool) -> np.ndarray:
    """A head's own scores as probabilities: themselves, or the softmax of its decision values."""
    return np.asarray(scores, dtype=np.float64) if probabilities else softmax(logits(scores, False))


def assess_multilabel(Y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray | None, probabilities: bool) -> dict:
    """ece and ece_uncalibrated of a multi-label head: the mean over classes of the ECE of each class's
    `two_classes` scores against its 0/1 labels (one-vs-rest), of the `calibrated` scores (None: the head's
    own are given) and of the head's own (a sigmoid of its decision values when it has no probabilities);
    and the reliability table of the scores given, every (image, class) pair pooled."""
    def pairs(scores, of_probabilities, c=slice(None)):
        return uncalibrated(two_classes(np.ravel(scores[:, c]), of_probabilities), of_probabilities)

    def ece(scores, of_probabilities):
        return float(np.mean([expected_calibration_error(reliability(pairs(scores, of_probabilities, c), Y[:, c]))
                              for c in range(Y.shape[1])]))
    own = ece(raw, probabilities)
    given = (raw, probabilities) if calibrated is None else (calibrated, True)
    return {"ece": own if calibrated is None else ece(calibrated, True), "ece_uncalibrated": own,
            "reliability": reliability(pairs(*given), np.ravel(Y))}


def assess(y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, probabilities: bool) -> dict:
    """ece (of the scores given), ece_uncalibrated (of the head's own) and the reliability table."""
    table = reliability(calibrated, y)
    return {"ece": expected_calibration_error(table),
            "ece_uncalibrated": expected_calibration_error(reliability(uncalibrated(raw, probabilities), y)),
            "reliability": table}
