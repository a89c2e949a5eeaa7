"""Transfer learning on images as a two-stage feature-cache pipeline, as a library (the names of `__all__`,
defined in pipeline.api) and a command line (`pipeline --help`).

The API's names (InputError too) load pipeline.api on first use: importing one module of the package (as each DVC stage
does) does not import the API, whose functions reach every stage's modules."""
import importlib

__version__ = "0.1.0"
__all__ = ["extract", "open_cache", "train", "load_model", "compare", "audit", "finetune", "select", "InputError",
           "FeatureCache", "Model", "Prediction", "Summary", "AuditResult", "__version__"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("pipeline.api"), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
