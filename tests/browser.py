"""Headless chromium for the tests that open pages in a real browser, with network features off."""
from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")


def dump_dom(page: Path, profile: Path) -> str:
    """The page's DOM once it has loaded and its scripts have run (up to 10 s of virtual time)."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout


class Elements(HTMLParser):
    """Tags with their attributes, and the text inside each tag, as a browser's parser sees them."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.texts: list[tuple[str, dict, str]] = []     # (tag, its attributes, a piece of text directly in it)
        self.open: list[tuple[str, dict]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.open.append(self.tags[-1])

    def handle_endtag(self, tag):
        names = [name for name, _ in self.open]
        if tag in names:
            del self.open[len(names) - 1 - names[::-1].index(tag):]

    def handle_data(self, data):
        if self.open:
            self.texts.append((*self.open[-1], data))

    def all(self, tag: str) -> list[dict]:
        return [attrs for t, attrs in self.tags if t == tag]
