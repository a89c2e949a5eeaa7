"""DVC stage `train@NAME`: python stages/train.py NAME FEATURES OUT_DIR (settings: params.yaml `train.NAME`)"""
import sys
from pathlib import Path

from pipeline.config import read_params
from pipeline.heads.settings import train_settings
from pipeline.runtime.errors import run_stage
from pipeline.runtime.imports import heavy_imports


def main():
    name, features, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    s = train_settings(name, read_params("train").get(name))
    with heavy_imports():   # torch and sklearn load once the settings are accepted
        from pipeline.heads.classifiers import import_libraries
        from pipeline.heads.train import train
        import_libraries(s.classifier)
    m = train(features, out, s)
    print(f"{name}: top-1 {m['top1']:.3f} on {m['eval_split']}, chosen {m['hyperparameters']}, "
          f"fit {m['fit_seconds']:.1f}s")


run_stage(main)
