"""Label issues of a multi-label cache, one per (image, class): a likely missing tag (the class is not in the
image's labels, yet predicted) or a likely wrong tag (in its labels, yet predicted absent).

As cleanlab.multilabel_classification does, each class is a binary problem of its own: confident learning
(pipeline.auditing.label_issues, with its pruning and its `min_score`) runs on [1 - p, p] of that class's
out-of-fold one-vs-rest probability p against its column of the label matrix. The flagged cells of all
classes are ranked together by their score, 1 - the probability of the given value: p for a missing tag,
1 - p for a wrong one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score

from pipeline.auditing.label_issues import MAX_CALIBRATION_ERROR, calibration_error, find_label_issues
from pipeline.heads.metrics import macro_ap

MIN_MACRO_AP = 0.9   # out-of-fold macro AP on the cells not flagged from which flagged ones are called tag errors


@dataclass
class TagIssues:
    rows: np.ndarray           # image of each flagged cell, most likely error first
    classes: np.ndarray        # its class
    missing: np.ndarray        # True: a missing tag; False: a wrong tag
    score: np.ndarray          # 1 - out-of-fold probability of the given value, in [0, 1]
    probabilities: np.ndarray  # [N, K] out-of-fold, one-vs-rest


def find_tag_issues(probabilities: np.ndarray, Y: np.ndarray, min_score: float = 0.0) -> TagIssues:
    """Flag and rank the (image, class) cells of the 0/1 matrix `Y` that the probabilities contradict."""
    found = []
    for c in range(Y.shape[1]):
        p = probabilities[:, c]
        issues = find_label_issues(np.stack([1 - p, p], 1), Y[:, c].astype(np.int64), min_score)
        found.append((issues.rows, np.full(len(issues.rows), c), issues.score[issues.rows]))
    rows, classes, score = (np.concatenate(part) for part in zip(*found))
    order = np.lexsort((classes, rows, -score))   # ties: by image, then class
    rows, classes = rows[order], classes[order]
    return TagIssues(rows, classes, Y[rows, classes] == 0, score[order], probabilities)


@dataclass
class TagTrust:
    """How far the flagged cells can be taken for tag errors."""
    macro_ap: float            # out-of-fold macro AP against the given labels
    macro_ap_unlisted: float   # the same over the cells not flagged
    calibration_error: float   # expected calibration error of the cells' binary probabilities
    judged: bool               # whether the classifier is strong enough to call the flagged cells errors

    def as_dict(self) -> dict:
        return {"out_of_fold_macro_ap": round(self.macro_ap, 4),
                "macro_ap_on_unlisted": round(self.macro_ap_unlisted, 4),
                "calibration_error": round(self.calibration_error, 4), "judged": self.judged,
                "minimum_macro_ap": MIN_MACRO_AP, "maximum_calibration_error": MAX_CALIBRATION_ERROR}


def trust(issues: TagIssues, Y: np.ndarray) -> TagTrust:
    """The classifier's figures against the given labels, and whether its macro AP over the cells it does not
    flag reaches MIN_MACRO_AP with a calibration error within MAX_CALIBRATION_ERROR (the single-label audit's
    rule, with macro AP in place of accuracy)."""
    P = issues.probabilities
    unlisted = np.ones(Y.shape, bool)
    unlisted[issues.rows, issues.classes] = False
    per_class = [average_precision_score(Y[keep, c], P[keep, c])
                 for c, keep in enumerate(unlisted.T) if Y[keep, c].any()]
    cells = P.ravel()
    error = calibration_error(np.stack([1 - cells, cells], 1), Y.ravel())
    ap, ap_unlisted = macro_ap(Y, P), float(np.mean(per_class)) if per_class else float("nan")
    return TagTrust(ap, ap_unlisted, error, ap_unlisted >= MIN_MACRO_AP and error <= MAX_CALIBRATION_ERROR)
