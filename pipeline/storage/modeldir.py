"""A trained model directory: self-describing, checked before anything is unpickled.

  model.json     classes, backbone spec, cache fingerprint, preprocessing, SHA-256 of each file
  head.joblib    kind "features": the fitted preprocessing + classifier (a pickle: load only
                 directories you trust)
  weights.pt     kind "finetuned": the network's state dict (tensors only, loaded with weights_only)
  metrics.json   the headline metrics, one value each, for `dvc metrics show`
  details.json   the chosen hyperparameters, the search that chose them, per-class precision and recall
  confusion.json {actual, predicted} rows for `dvc plots show`
"""
from __future__ import annotations

import json
from pathlib import Path

import joblib

from pipeline.runtime.errors import UserError
from pipeline.runtime.files import sha256_file

DETAILS = ("hyperparameters", "search", "per_class")   # metrics that go to details.json
HEAD = "head.joblib"
WEIGHTS = "weights.pt"


def check_out(out_dir: Path) -> None:
    """Refuse, before any training, an output path that cannot become a directory."""
    blocker = next((p for p in (Path(out_dir), *Path(out_dir).parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"--out {out_dir}: {blocker} is a file, not a folder")


def save(out_dir: Path, model, info: dict, metrics: dict, confusion: list[dict]) -> None:
    """`model`: a fitted head (kind "features") or a state dict (kind "finetuned"). `metrics` is split
    into metrics.json (headline) and details.json (`DETAILS`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if info["kind"] == "finetuned":
        import torch
        name = WEIGHTS
        torch.save(model, out_dir / name)
    else:
        name = HEAD
        joblib.dump(model, out_dir / name)
    headline = {k: v for k, v in metrics.items() if k not in DETAILS}
    (out_dir / "metrics.json").write_text(json.dumps(headline, indent=2) + "\n")
    details = {k: metrics[k] for k in DETAILS if k in metrics}
    (out_dir / "details.json").write_text(json.dumps(details, indent=2) + "\n")
    (out_dir / "confusion.json").write_text(json.dumps(confusion) + "\n")
    info = dict(info, files={name: sha256_file(out_dir / name)})
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
    model_file = WEIGHTS if info["kind"] == "finetuned" else HEAD
    if model_file not in info["files"]:
        raise UserError(f"{Path(model_dir) / 'model.json'} records no SHA-256 for {model_file}; refusing to load it")
    for name, digest in info["files"].items():
        path = Path(model_dir) / name
        if not path.is_file():
            raise UserError(f"model directory {model_dir} lacks {name}")
        if sha256_file(path) != digest:
            raise UserError(f"{path} does not match the SHA-256 recorded in model.json; refusing to load it")
    return info


def load(model_dir: Path) -> tuple[dict, object]:
    """(model.json, fitted head or state dict), loaded only after `verify`."""
    info = verify(model_dir)
    path = Path(model_dir) / (WEIGHTS if info["kind"] == "finetuned" else HEAD)
    if info["kind"] == "finetuned":
        import torch
        return info, torch.load(path, map_location="cpu", weights_only=True)
    return info, joblib.load(path)
