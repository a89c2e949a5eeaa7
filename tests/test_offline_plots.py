"""`dvc plots show` with the project's offline HTML template and confusion template: a real DVC repository,
a real browser with network features off, counts drawn in the cells."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from tests.browser import Elements, dump_dom, needs_chromium
from tests.conftest import ROOT

PAGE = ROOT / "build" / "vega" / "dvc_plots.html"
PAIRS = [("cat", "cat")] * 3 + [("cat", "dog")] + [("dog", "dog")] * 2 + [("bird", "cat")] * 4


@pytest.fixture(scope="module")
def offline_page():
    """The template `make plots` writes (its npm packages are downloaded once and kept in build/vega/)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "offline_plots_page.py"), str(PAGE)],
                          check=False, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"the Vega scripts could not be fetched from the npm registry: {proc.stderr.strip()}")
    return PAGE


@pytest.mark.slow
@needs_chromium
def test_confusion_plot_renders_offline_with_counts(tmp_path, offline_page):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / ".dvc" / "plots").mkdir()
    shutil.copy(ROOT / ".dvc" / "plots" / "confusion_counts.json", repo / ".dvc" / "plots")
    train_plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["plots"]
    props, = [props for plot in train_plots for path, props in plot.items() if path.endswith("/confusion.json")]
    props.pop("cache")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": [{"confusion.json": props}]}))
    (repo / "confusion.json").write_text(json.dumps([{"actual": a, "predicted": p} for a, p in PAIRS]))

    subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(offline_page)],
                   cwd=repo, check=True, capture_output=True, timeout=120)
    page = repo / "dvc_plots" / "index.html"
    scripts = Elements(page.read_text(encoding="utf-8")).all("script")
    assert len(scripts) >= 4 and not [s for s in scripts if "src" in s]       # all inline, none from a CDN

    cells = {attrs["aria-label"]: text for tag, attrs, text in Elements(dump_dom(page, tmp_path / "profile")).texts
             if tag == "text" and attrs.get("aria-roledescription") == "text mark"}
    counts = Counter(PAIRS)
    for actual in ("bird", "cat", "dog"):
        for predicted in ("cat", "dog"):
            n = counts[actual, predicted]
            assert cells.get(f"predicted: {predicted}; actual: {actual}; xy_count: {n}", "") == (str(n) if n else ""), \
                cells
    assert len([text for text in cells.values() if text]) == len(counts)
