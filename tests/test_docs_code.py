"""Every ```python block of README.md and docs/*.md runs, or is marked ```python no-run (docs/python.md)."""
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT, make_image_folder

PAGES = [pytest.param(ROOT / "README.md", marks=pytest.mark.slow),   # extracts, trains and audits: 35 s
         *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix() if isinstance(p, Path) else None)
def test_python_blocks_run_or_say_they_do_not(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "images")   # the README's example reads images/{train,val,test}/CLASS/
    namespace = {"__name__": "__main__"}
    for marker, code in BLOCK.findall(page.read_text()):
        assert marker.strip() in ("", "no-run"), f"{page.name}: unknown marker ```python{marker}"
        if marker.strip() != "no-run":
            exec(compile(code, str(page), "exec"), namespace)
