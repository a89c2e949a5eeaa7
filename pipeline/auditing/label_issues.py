"""Label issues by confident learning (Northcutt, Jiang and Chuang, JAIR 2021) on out-of-fold probabilities.

Every labelled image gets predicted probabilities from a cheap head that never saw it (stratified
K-fold over all splits). Each class's threshold is the mean probability of that class over the images
labelled with it; an image counts in the confident joint C[given, guess] when some class reaches its
threshold (the guess is the likeliest such class). The joint is calibrated to the label counts, and
for each off-diagonal cell (given i, true j) the round(C[i, j]) images labelled i with the largest
margin p_j - p_i are flagged ("prune by noise rate"), never an image whose prediction is its label, and
only those whose score reaches `min_score` (on the demo and the digits with 5% of labels flipped, the cut
at 0.9 raised the precision of the list from 0.36 and 0.83 to 0.54 and 0.93, at a recall of 0.71 and 0.89).
Flagged images are ranked by self-confidence: score = 1 - p(given label).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.multiclass import OneVsRestClassifier

from pipeline.heads.calibration import expected_calibration_error, reliability
from pipeline.heads.torch_heads import TorchLogReg

MIN_ACCURACY = 0.9             # out-of-fold accuracy on the unflagged images from which the flagged ones are
MAX_CALIBRATION_ERROR = 0.15   # called label errors, and the largest calibration error


@dataclass
class LabelIssues:
    rows: np.ndarray         # indices of flagged images, most likely error first
    suggested: np.ndarray    # [N] the likeliest class of each image
    score: np.ndarray        # [N] 1 - p(given label), in [0, 1]
    probabilities: np.ndarray   # [N, K] out-of-fold


def l2_normalised(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, n_classes: int, folds: int = 5, C: float = 10.0,
                              seed: int = 0) -> np.ndarray:
    """[N, K] probabilities, each row from a logistic regression on L2-normalised vectors fitted without
    that row (torch_logreg: sklearn's objective, with at most 100 L-BFGS steps whatever the data).
    A class with fewer images than `folds` is absent from some fits: its column is 0 there.
    `y` may be a [N, K] 0/1 label matrix: then each class's probability comes from a one-vs-rest logistic
    regression, over shuffled folds (a class on no training image of a fold, or on every one, gets 0 or 1)."""
    X = l2_normalised(np.asarray(X, np.float32))
    out = np.zeros((len(y), n_classes))
    for train, held_out in fold_rows(y, folds, seed):
        if y.ndim == 2:
            with warnings.catch_warnings():   # "label not 1 is present in all training examples": a constant
                warnings.filterwarnings("ignore", category=UserWarning, module="sklearn.multiclass")
                model = OneVsRestClassifier(TorchLogReg(C=C, device="cpu")).fit(X[train], y[train])
            out[held_out] = model.predict_proba(X[held_out])
        else:
            model = TorchLogReg(C=C, device="cpu").fit(X[train], y[train])
            out[np.ix_(held_out, model.classes_)] = model.predict_proba(X[held_out])
    return out


def fold_rows(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fitted rows, held-out rows) of each fold: stratified for a label vector (at most as many folds as the
    largest class has images), shuffled for a label matrix (at most one per image)."""
    if y.ndim == 2:
        return list(KFold(min(folds, len(y)), shuffle=True, random_state=seed).split(y))
    splitter = StratifiedKFold(int(min(folds, np.bincount(y).max())), shuffle=True, random_state=seed)
    with warnings.catch_warnings():   # "the least populated class has only n members": handled above
        warnings.filterwarnings("ignore", category=UserWarning, module="sklearn.model_selection")
        return list(splitter.split(y, y))


def confident_joint(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[K, K] counts of (given label, confidently guessed class), calibrated so that each row sums to
    that label's count and the whole to N."""
    n_classes = probabilities.shape[1]
    counts = np.bincount(labels, minlength=n_classes)
    thresholds = np.array([probabilities[labels == j, j].mean() if counts[j] else 1.0 for j in range(n_classes)])
    confident = probabilities >= thresholds - 1e-6
    several = confident.sum(1) > 1
    guess = np.where(several, probabilities.argmax(1), confident.argmax(1))
    sure = confident.any(1)
    joint = np.zeros((n_classes, n_classes))
    np.add.at(joint, (labels[sure], guess[sure]), 1)
    np.fill_diagonal(joint, np.maximum(joint.diagonal(), 1))   # every class keeps a correctly labelled image
    joint = joint / joint.sum(1, keepdims=True) * counts[:, None]
    return joint / joint.sum() * counts.sum()


def find_label_issues(probabilities: np.ndarray, labels: np.ndarray, min_score: float = 0.0) -> LabelIssues:
    """Flag and rank the images whose given label the probabilities contradict (see the module docstring)."""
    labels = np.asarray(labels)
    n, n_classes = probabilities.shape
    joint = np.round(confident_joint(probabilities, labels)).astype(int)
    flagged = np.zeros(n, bool)
    for given in range(n_classes):
        rows = np.flatnonzero(labels == given)
        if len(rows) <= 1:
            continue
        for true in range(n_classes):
            count = min(joint[given, true], len(rows) - 1) if true != given else 0
            if count > 0:
                margin = probabilities[rows, true] - probabilities[rows, given]
                flagged[rows[np.argsort(-margin, kind="stable")[:count]]] = True
    suggested = probabilities.argmax(1)
    score = 1 - probabilities[np.arange(n), labels]
    flagged &= (suggested != labels) & (score >= min_score)
    rows = np.flatnonzero(flagged)
    rows = rows[np.argsort(-score[rows], kind="stable")]
    return LabelIssues(rows, suggested, np.clip(score, 0, 1), probabilities)


def calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error against the given labels, over `bins` equal-width bins of the top
    probability (the measure `pipeline train` reports as `ece`, there over 15 bins)."""
    return expected_calibration_error(reliability(probabilities, labels, bins))


@dataclass
class Trust:
    """How far the flagged list can be taken for label errors."""
    accuracy: float            # out-of-fold accuracy against the given labels
    accuracy_unlisted: float   # the same over the images not flagged: near its accuracy on right labels
    calibration_error: float   # expected calibration error of those probabilities
    judged: bool               # whether the classifier is strong enough to call the flagged images errors

    def as_dict(self) -> dict:
        return {"out_of_fold_accuracy": round(self.accuracy, 4),
                "accuracy_on_unlisted": round(self.accuracy_unlisted, 4),
                "calibration_error": round(self.calibration_error, 4), "judged": self.judged,
                "minimum_accuracy": MIN_ACCURACY, "maximum_calibration_error": MAX_CALIBRATION_ERROR}


def trust(issues: LabelIssues, labels: np.ndarray) -> Trust:
    """The classifier's figures against the given labels, and whether its accuracy on the images it does not
    flag reaches MIN_ACCURACY and its calibration error stays within MAX_CALIBRATION_ERROR. The flagged
    images are left out of that accuracy because wrong labels lower the accuracy against the given labels
    without the classifier being any weaker (benchmarks/RESULTS.md)."""
    right = issues.probabilities.argmax(1) == labels
    unlisted = np.ones(len(labels), bool)
    unlisted[issues.rows] = False
    accuracy, accuracy_unlisted = float(right.mean()), float(right[unlisted].mean())
    error = calibration_error(issues.probabilities, labels)
    return Trust(accuracy, accuracy_unlisted, error,
                 accuracy_unlisted >= MIN_ACCURACY and error <= MAX_CALIBRATION_ERROR)
