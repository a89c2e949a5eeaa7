"""DVC stage `finetune@NAME`: python stages/finetune.py NAME DATA OUT_DIR (settings: params.yaml `finetune.NAME`)"""
import sys
from pathlib import Path

from pipeline.config import stage_settings
from pipeline.tuning.settings import FinetuneSettings
from pipeline.runtime.errors import run_stage
from pipeline.runtime.imports import heavy_imports


def main():
    name, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    s = stage_settings(FinetuneSettings, "finetune", name)
    with heavy_imports():   # torch loads once the settings are accepted
        from pipeline.tuning.training import finetune
    m = finetune(data, out, s, quiet=True)
    print(f"{name} ({s.strategy}): top-1 {m['top1']:.3f} on {m['eval_split']}, best epoch {m['best_epoch']} "
          f"of {m['epochs_run']}, {m['fit_seconds']:.1f}s on {m['device']}")


run_stage(main)
