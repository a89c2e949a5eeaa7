"""docs/quickstart.ipynb, executed as a user would run it, reproduces the command line's results on its files."""
import csv
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import pipeline
from tests.conftest import ROOT, cli_in_process


@pytest.mark.slow
def test_the_quickstart_notebook_runs_and_agrees_with_the_command_line(tmp_path):
    notebook = nbformat.read(ROOT / "docs" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    work = tmp_path / "quickstart"
    cache, models = work / "features.h5", work / "models"

    assert cli_in_process("train", cache, "--out", tmp_path / "logreg", "-q").returncode == 0
    for name in ("metrics.json", "details.json"):
        cli, api = (json.loads((d / name).read_text()) for d in (tmp_path / "logreg", models / "logreg"))
        for volatile in ("fit_seconds", "predict_seconds", "extract_seconds"):   # the second extract rewrote it
            cli.pop(volatile, None), api.pop(volatile, None)
        assert cli == api, name

    shown = cli_in_process("predict", models / "ridge", work / "images" / "test", "--format", "json", "--top-k", 1)
    cli_top = {r["path"]: r["top"][0]["class"] for r in json.loads(shown.stdout)}
    api_top = {p.path: p.labels[0] for p in pipeline.load_model(models / "ridge").predict(work / "images" / "test")}
    assert cli_top == api_top and len(cli_top) == 18

    assert cli_in_process("compare", models, "--out", tmp_path / "reports").returncode == 0
    table = json.loads((tmp_path / "reports" / "compare.json").read_text())
    assert [r["selected"] for r in table].count(True) == 1
    assert table == json.loads(json.dumps(pipeline.compare([models])))

    assert cli_in_process("audit", cache, "--out", tmp_path / "audit", "-q").returncode == 0
    report = pipeline.audit(cache)
    for name in ("label_issues", "duplicates", "outliers"):
        with open(tmp_path / "audit" / f"{name}.csv", newline="") as f:
            assert list(csv.DictReader(f)) == getattr(report, name), name
    assert not Path(ROOT / "docs" / "quickstart").exists()
