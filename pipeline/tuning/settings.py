"""The settings of the optional fine-tune stage (kept free of torch, for a quick command line)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.data.folders import DatasetSettings
from pipeline.features.settings import BackboneSettings
from pipeline.heads.settings import TrustSettings
from pipeline.runtime.devices import device_setting
from pipeline.runtime.errors import InputError
from pipeline.runtime.settings import setting

STRATEGIES = ("full", "partial", "head", "scratch")


@dataclass
class FinetuneSettings(TrustSettings, BackboneSettings, DatasetSettings):
    """The optional stage: params.yaml `finetune.<run>` and the options of `pipeline finetune`. 'scratch'
    ignores `weights` and always starts from random weights."""
    strategy: str = setting("full", "full: all layers; partial: freeze the first --freeze stages; head: frozen "
                                    "backbone; scratch: random init, all layers.", choices=STRATEGIES)
    freeze: int | None = setting(None, "partial: stages to freeze; default: half.", min=1)
    epochs: int = setting(10, "Epochs in all, head-only ones included.", min=1, max=100000)
    head_epochs: int = setting(0, "Two-phase schedule: train only the head for this many epochs first, then "
                                  "unfreeze.", min=0)
    batch_size: int = setting(32, "Images per step (per process under torchrun).", min=1, max=65536)
    optimizer: str = setting("sgd", "SGD with momentum or AdamW.", choices=("sgd", "adamw"))
    lr: float = setting(0.01, "Learning rate of the new head.", above=0)
    backbone_lr_scale: float = setting(0.1, "Backbone learning rate = lr x this (scratch: 1).", min=0)
    weight_decay: float = setting(1e-4, "Weight decay.", min=0)
    momentum: float = setting(0.9, "SGD momentum.", min=0, below=1)
    schedule: str = setting("cosine", "cosine annealing over the epochs, or step-on-plateau of val accuracy.",
                            choices=("cosine", "plateau"))
    plateau_patience: int = setting(2, "plateau: epochs without val improvement before the learning rate decays.",
                                    min=0)
    plateau_factor: float = setting(0.1, "plateau: decay factor.", above=0, below=1)
    max_decays: int = setting(2, "plateau: stop at the next plateau after this many decays.", min=0)
    patience: int | None = setting(None, "Early stopping: epochs without val improvement; default: off.", min=1)
    random_crop: bool = setting(True, "Augment: random resized crop (50-100% of the area).")
    flip: bool = setting(True, "Augment: random horizontal flip.")
    rotation: float = setting(0.0, "Augment: random rotation up to this many degrees.", min=0, max=180)
    color_jitter: float = setting(0.0, "Augment: brightness/contrast/saturation jitter strength.", min=0)
    device: str = device_setting(" (mixed precision, channels-last)")
    workers: int | None = setting(None, "DataLoader decoding workers; default: the CPU count, at most 8.",
                                  min=0, max=256)
    scale_lr: bool = setting(True, "Under torchrun: multiply --lr by the number of processes (linear scaling "
                                   "rule for the larger global batch).")

    def check(self) -> None:
        if self.head_epochs >= self.epochs:
            raise InputError(f"finetune needs head_epochs < epochs, got epochs={self.epochs}, "
                            f"head_epochs={self.head_epochs}")
        if self.head_epochs and self.strategy == "head":
            raise InputError("head_epochs (two-phase) applies to full, partial and scratch, not to head")
        if self.freeze is not None and self.strategy != "partial":
            raise InputError(f"freeze applies to the partial strategy only, not to {self.strategy}")
