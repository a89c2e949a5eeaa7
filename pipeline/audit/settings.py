"""The settings of `pipeline audit` and of the DVC stage `audit`, each defined once (light to import)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.runtime.errors import UserError, check_minimums

@dataclass
class AuditSettings:
    folds: int = 5                      # stratified folds for the out-of-fold probabilities
    C: float = 10.0                     # of their logistic regression, on L2-normalised vectors
    neighbours: int = 10                # k of the k-NN outlier scores and of the duplicate search
    duplicate_threshold: float = 0.92   # cosine similarity from which two images are near-duplicates
    outlier_cut: float = 2.0            # outlier from this isolation (k-NN distance over the median's)
    exact_up_to: int = 5000             # vectors searched exactly; more go through an inverted file
    seeds: int = 5                      # draws per point of the learning curve
    seed: int = 0                       # folds, k-means and draws

    def check(self) -> None:
        check_minimums({"folds": 2, "neighbours": 1, "exact_up_to": 1, "seeds": 1}, asdict(self))
        if not 0 < self.duplicate_threshold <= 1:
            raise UserError(f"duplicate_threshold must be in (0, 1], got {self.duplicate_threshold}")
        if not self.C > 0 or not self.outlier_cut > 0:
            raise UserError(f"C and outlier_cut must be above 0, got {self.C} and {self.outlier_cut}")
