"""DVC stage `finetune@NAME`: python stages/finetune.py NAME DATA OUT_DIR (settings: params.yaml `finetune.NAME`)"""
import sys

from pipeline.config import stage_settings
from pipeline.runtime.errors import run_stage
from pipeline.runtime.imports import heavy_imports
from pipeline.runtime.settings import keywords
from pipeline.tuning.settings import FinetuneSettings


def main():
    name, data, out = sys.argv[1:4]
    s = stage_settings(FinetuneSettings, "finetune", name)
    with heavy_imports():   # torch loads once the settings are accepted; what pipeline.finetune runs
        import pipeline.tuning.training
    m = pipeline.finetune(data, out, quiet=True, **keywords(s)).metrics
    from pipeline.heads.metrics import headline   # sklearn is loaded by now
    print(f"{name} ({s.strategy}): {headline(m)} on {m['eval_split']}, best epoch {m['best_epoch']} "
          f"of {m['epochs_run']}, {m['fit_seconds']:.1f}s on {m['device']}")


run_stage(main)
