"""DVC stage `select@NAME`: python stages/selection.py FEATURES OUT_CSV (settings: params.yaml `select`). Not
named select.py: as a script its folder comes first on the path, where it would stand for the standard library's
`select`."""
import sys
from pathlib import Path

from pipeline.config import stage_settings
from pipeline.runtime.errors import run_stage
from pipeline.runtime.imports import heavy_imports
from pipeline.runtime.settings import keywords
from pipeline.selection.settings import SelectSettings


def main():
    features, out = Path(sys.argv[1]), Path(sys.argv[2])
    s = stage_settings(SelectSettings, "select")
    with heavy_imports():   # scikit-learn loads once the settings are accepted; what pipeline.select runs
        import pipeline.selection.run
    rows = pipeline.select(features, out, **keywords(s))
    print(f"{len(rows)} images to label, picked by {rows[0]['strategy']} -> {out}")


run_stage(main)
