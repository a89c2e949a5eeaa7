"""The settings of `pipeline select` and of the DVC stage `select`, each defined once (light to import)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.runtime.settings import setting

STRATEGIES = ("auto", "typical", "margin", "coverage", "random")


@dataclass
class SelectSettings:
    budget: int = setting(10, "Pool images to pick for labelling in this round.", min=1)
    strategy: str = setting("auto", "typical: the most typical image of each largest cluster without a labelled "
                                    "image (TypiClust); margin: the smallest top-2 margin of a logistic regression "
                                    "on the labelled images, one per cluster; coverage: greedy k-center; random; "
                                    "auto: typical below --auto-switch labelled images per class, then margin.",
                            choices=STRATEGIES)
    auto_switch: float = setting(5.0, "Labelled images per class (train and val) from which auto picks by margin.",
                                 min=0)
    neighbours: int = setting(20, "k of typicality: the inverse mean distance to the k nearest images of the "
                                  "same cluster.", min=1)
    components: int = setting(128, "PCA components the L2-normalised vectors are reduced to for the k-means and "
                                  "the distances.", min=1)
    C: float = setting(10.0, "C of margin's logistic regression, on L2-normalised vectors.", above=0)
    seed: int = setting(0, "Seed of the PCA, the k-means and random.")
