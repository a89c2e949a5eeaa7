"""The settings of `pipeline predict` (kept free of torch, for a quick command line)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.features.settings import EngineSettings
from pipeline.runtime.devices import device_setting
from pipeline.runtime.settings import setting


@dataclass
class PredictSettings(EngineSettings):
    """Prediction with a model directory: how many classes per image, and where the network runs."""
    top_k: int = setting(5, "Classes to show per image.", min=1)
    device: str = device_setting()
