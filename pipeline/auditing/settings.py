"""The settings of `pipeline audit` and of the DVC stage `audit`, each defined once (light to import)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.runtime.settings import setting


@dataclass
class AuditSettings:
    folds: int = setting(5, "Stratified folds for the out-of-fold probabilities behind the label issues.", min=2,
                         max=100)
    C: float = setting(10.0, "C of their logistic regression, on L2-normalised vectors.", above=0)
    issue_score: float = setting(0.9, "A label issue only from this score (1 - out-of-fold probability of the "
                                 "given label).", min=0, max=1)
    neighbours: int = setting(10, "k of the k-NN outlier scores and of the duplicate search; below the "
                              "number of images.", min=1, max=1000)
    duplicate_threshold: float = setting(0.90, "Cosine similarity (of standardised vectors) from which two "
                                         "images are near-duplicates.", above=0, max=1)
    pixel_check_from: float = setting(0.6, "From this similarity, a pair under the duplicate threshold is a "
                                      "near-duplicate if its pixels match (when the images are readable; 1: off).",
                                      above=0, max=1)
    pixel_match: float = setting(0.992, "Correlation of two 32x32 grey thumbnails, aligned (a crop of up to 12% "
                                 "from any side, a rescale, a mirror undone), from which their pixels match.",
                                 above=0, max=1)
    outlier_cut: float = setting(2.0, "Outliers flagged from this score (k-NN and class-centre distances over "
                                 "the median image's); outliers.csv ranks every image.", above=0)
    exact_up_to: int = setting(5000, "Vectors searched exactly; more go through an inverted file.", min=1)
    seeds: int = setting(5, "Draws per point of the learning curve.", min=1, max=100)
    seed: int = setting(0, "Seed of the folds, the k-means and the draws.")
