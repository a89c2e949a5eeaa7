"""DVC stage `train@NAME`: python stages/train.py NAME FEATURES OUT_DIR (settings: params.yaml `train.NAME`)"""
import sys
from pathlib import Path

from pipeline.heads.train import train

from pipeline.cli import run_stage
from pipeline.config import read_params, train_settings


def main():
    name, features, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    section = read_params(Path("params.yaml"), "train")
    m = train(features, out, train_settings(name, section.get(name)))
    print(f"{name}: top-1 {m['top1']:.3f} on {m['eval_split']}, chosen {m['hyperparameters']}, "
          f"fit {m['fit_seconds']:.1f}s")


run_stage(main)
