"""Transfer learning on images as a two-stage feature-cache pipeline, as a library (the names below: see
pipeline.api) and a command line (`pipeline --help`)."""
__version__ = "0.1.0"

from pipeline.api import (AuditResult, FeatureCache, Model, Prediction, Summary, audit, compare, extract, finetune,
                          load_model, open_cache, train)
from pipeline.runtime.errors import InputError

__all__ = ["extract", "open_cache", "train", "load_model", "compare", "audit", "finetune", "InputError",
           "FeatureCache", "Model", "Prediction", "Summary", "AuditResult", "__version__"]
