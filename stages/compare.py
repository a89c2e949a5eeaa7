"""DVC stage `compare`: python stages/compare.py OUT_FOLDER MODEL_DIR... (the table goes to OUT_FOLDER/compare.md)"""
import sys
from pathlib import Path

from pipeline.runtime.errors import run_stage


def main():
    import pipeline.report.compare   # what pipeline.compare runs
    out = Path(sys.argv[1])
    table = pipeline.compare(sys.argv[2:], out)
    best = table[0]
    evaluated = f"macro AP {best['macro_ap']:.3f}" if best["multi_label"] else f"{best['top1']:.3f}"
    print(f"compare: {len(table)} models ranked by their selection score -> {out / 'compare.md'}; selected "
          f"{best['name']}: {best['val_score']:.3f} ({best['selection']}), {evaluated} on {best['eval_split']}")


run_stage(main)
