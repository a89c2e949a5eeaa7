"""DVC stage `audit@NAME`: python stages/audit.py FEATURES OUT_DIR (settings: params.yaml `audit`)"""
import sys

from pipeline.auditing.settings import AuditSettings
from pipeline.config import stage_settings
from pipeline.runtime.errors import run_stage
from pipeline.runtime.imports import heavy_imports
from pipeline.runtime.printing import say
from pipeline.runtime.settings import keywords


def main():
    features, out = sys.argv[1:3]
    s = stage_settings(AuditSettings, "audit")
    with heavy_imports():   # torch loads once the settings are accepted; what pipeline.audit runs
        import pipeline.auditing.run
        import pipeline.report.audit_page
    result = pipeline.audit(features, out, log=say, **keywords(s))
    summary = result.summary
    say(f"{summary['label_issues']} label issues, {summary['duplicate_groups']} near-duplicate groups "
        f"({summary['leak_groups']} across splits), {summary['outliers']} outliers -> {result.page}")


run_stage(main)
