"""DVC stage `train@NAME`: python stages/train.py NAME FEATURES OUT_DIR (settings: params.yaml `train.NAME`)"""
import sys

from pipeline.config import read_params
from pipeline.heads.settings import train_settings
from pipeline.runtime.errors import run_stage
from pipeline.runtime.imports import heavy_imports


def main():
    name, features, out = sys.argv[1:4]
    raw = read_params("train").get(name) or {}
    train_settings(name, raw)   # refused here, naming the key of params.yaml
    with heavy_imports():   # torch and sklearn load once the settings are accepted
        from pipeline.heads.classifiers import import_libraries
        import pipeline.heads.train   # what pipeline.train runs
        import_libraries(name)
    model = pipeline.train(features, name, out, **raw)
    m = model.metrics
    from pipeline.heads.metrics import headline   # sklearn is loaded by now
    print(f"{name}: {headline(m)} on {m['eval_split']}, chosen {model.details['hyperparameters']}, "
          f"fit {m['fit_seconds']:.1f}s")


run_stage(main)
