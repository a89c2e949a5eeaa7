"""Importing torch, torchvision, timm or scikit-learn creates millions of Python objects, and Python's cyclic
garbage collector walks them again and again while they are created, and once more when the process exits:
about half of the seconds a command spends before and after its work. Imports leave no garbage worth
collecting, so a command starts with the collector off, and what its imports made is then frozen: never
walked again, also not in forked DataLoader workers, whose memory pages stay shared with the parent's."""
from __future__ import annotations

import contextlib
import gc
import importlib


def collect_after_imports() -> None:
    """The first call of a command's process: the collector is off until its modules are imported."""
    gc.disable()


@contextlib.contextmanager
def heavy_imports():
    """Wrap a command's lazy import of the modules that do its work; the collector is on afterwards."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def preload(*modules: str) -> None:
    """Import the modules that do a command's work (by name) within `heavy_imports`; the API functions the
    command then calls import them where they are used."""
    with heavy_imports():
        for name in modules:
            importlib.import_module(name)
