"""params.yaml: each stage reads its own section into its settings object (pipeline.runtime.settings),
which checks every value."""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.runtime.errors import InputError, quote
from pipeline.runtime.files import read_regular
from pipeline.runtime.settings import from_mapping, key_name

PARAMS = Path("params.yaml")
PARAMS_LIMIT = 1 << 20   # bytes: a settings file, read without blocking and only if regular


def read_params(section: str, path: Path = PARAMS) -> dict:
    """The mapping under `section` of the YAML file `path` ({} when absent)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    try:
        text = read_regular(path, PARAMS_LIMIT)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text.decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r})")
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not valid YAML: {str(exc).splitlines()[0][:200]}")
    if not isinstance(raw, dict):
        raise InputError(f"{path} must be a mapping of sections, got {quote(raw)}")
    if not isinstance(raw.get(section) or {}, dict):
        raise InputError(f"{path}: '{section}' must be a mapping, got {quote(raw[section])}")
    return raw.get(section) or {}


def stage_settings(cls, section: str, key: str | None = None, path: Path = PARAMS):
    """Settings `cls` from `section` of params.yaml, or from its entry `key`."""
    raw = read_params(section, path)
    return from_mapping(cls, raw.get(key) if key else raw, f"{section}.{key}" if key else section)


def sweep_settings(cls, section: str, sweep: str, name: str, path: Path = PARAMS):
    """Settings `cls` of run `name` of a sweep: params.yaml `section` with `sweep.NAME` (the settings this
    run changes) on top, e.g. extractor `lite0_224` of `extractors` over `extract`."""
    runs = read_params(sweep, path)
    if name not in runs:
        raise InputError(f"{path}: {sweep} has no '{key_name(name)}'; it has: {', '.join(map(str, runs)) or 'none'}")
    own = runs[name] or {}
    if not isinstance(own, dict):
        raise InputError(f"{path}: {sweep}.{name} must be a mapping of {section} settings, got {quote(own)}")
    base = read_params(section, path)
    from_mapping(cls, base, section)
    return from_mapping(cls, {**base, **own}, f"{sweep}.{name}")
