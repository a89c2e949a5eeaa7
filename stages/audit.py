"""DVC stage `audit@NAME`: python stages/audit.py FEATURES OUT_DIR (settings: params.yaml `audit`)"""
import sys
from pathlib import Path

from pipeline.auditing.settings import AuditSettings
from pipeline.config import stage_settings
from pipeline.runtime.errors import run_stage
from pipeline.runtime.imports import heavy_imports
from pipeline.runtime.printing import say


def main():
    features, out = Path(sys.argv[1]), Path(sys.argv[2])
    s = stage_settings(AuditSettings, "audit")
    with heavy_imports():   # torch loads once the settings are accepted
        from pipeline.auditing.run import audit
    summary = audit(features, out, s, log=say)
    say(f"{summary['label_issues']} label issues, {summary['duplicate_groups']} near-duplicate groups "
        f"({summary['leak_groups']} across splits), {summary['outliers']} outliers -> {out / 'index.html'}")


run_stage(main)
