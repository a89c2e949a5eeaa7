"""DVC stage `extract@NAME`: python stages/extract.py NAME DATA OUT (settings: params.yaml `extract`, with
`extractors.NAME` on top)"""
import sys

import pipeline
from pipeline.config import sweep_settings
from pipeline.features.settings import ExtractSettings
from pipeline.runtime.errors import run_stage
from pipeline.runtime.imports import preload
from pipeline.runtime.settings import keywords


def main():
    name, data, out = sys.argv[1:4]
    s = sweep_settings(ExtractSettings, "extract", "extractors", name)
    preload("pipeline.features.extract")   # torch loads once the settings are accepted
    print("\n".join(pipeline.extract(data, out, **keywords(s)).summary.lines))


run_stage(main)
