"""DVC stage `extract@NAME`: python stages/extract.py NAME DATA OUT (settings: params.yaml `extract`, with
`extractors.NAME` on top)"""
import sys

from pipeline.config import sweep_settings
from pipeline.features.settings import ExtractSettings
from pipeline.runtime.errors import run_stage
from pipeline.runtime.imports import heavy_imports
from pipeline.runtime.settings import keywords


def main():
    name, data, out = sys.argv[1:4]
    s = sweep_settings(ExtractSettings, "extract", "extractors", name)
    with heavy_imports():   # torch loads once the settings are accepted; what pipeline.extract runs
        import pipeline.features.extract
    print("\n".join(pipeline.extract(data, out, **keywords(s)).summary.lines))


run_stage(main)
