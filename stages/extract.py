"""DVC stage `extract@NAME`: python stages/extract.py NAME DATA OUT (settings: params.yaml `extract`, with
`extractors.NAME` on top)"""
import sys
from pathlib import Path

from pipeline.config import sweep_settings
from pipeline.features.settings import ExtractSettings
from pipeline.runtime.errors import run_stage
from pipeline.runtime.imports import heavy_imports


def main():
    name, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    s = sweep_settings(ExtractSettings, "extract", "extractors", name)
    with heavy_imports():   # torch loads once the settings are accepted
        from pipeline.features.extract import extract_folder
    print("\n".join(extract_folder(data, out, s).lines()))


run_stage(main)
