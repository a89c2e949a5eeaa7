"""A trained model directory: self-describing, checked before anything is unpickled.

  model.json     classes, backbone spec, cache fingerprint, preprocessing, SHA-256 of each file
  head.joblib    the fitted preprocessing + classifier (a pickle: load only directories you trust)
  metrics.json   flat metrics for `dvc metrics show`
  confusion.json {actual, predicted} rows for `dvc plots show`
"""
from __future__ import annotations

import json
from pathlib import Path

import joblib

from pipeline.backbones import sha256_file
from pipeline.errors import UserError

HEAD = "head.joblib"


def save(out_dir: Path, model, info: dict, metrics: dict, confusion: list[dict]) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out_dir / HEAD)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "confusion.json").write_text(json.dumps(confusion) + "\n")
    info = dict(info, files={HEAD: sha256_file(out_dir / HEAD)})
    (out_dir / "model.json").write_text(json.dumps(info, indent=2) + "\n")


def read_info(model_dir: Path) -> dict:
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise UserError(f"{model_dir} is not a model directory (no model.json)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}")
    missing = [k for k in ("kind", "classes", "backbone", "fingerprint", "files") if k not in info]
    if missing:
        raise UserError(f"{path} lacks keys {missing}")
    return info


def verify(model_dir: Path) -> dict:
    """model.json, after checking every file it lists against its recorded SHA-256."""
    info = read_info(model_dir)
    for name, digest in info["files"].items():
        path = Path(model_dir) / name
        if not path.is_file():
            raise UserError(f"model directory {model_dir} lacks {name}")
        if sha256_file(path) != digest:
            raise UserError(f"{path} does not match the SHA-256 recorded in model.json; refusing to load it")
    return info


def load(model_dir: Path) -> tuple[dict, object]:
    """(model.json, fitted model), unpickled only after `verify`."""
    return verify(model_dir), joblib.load(Path(model_dir) / HEAD)
