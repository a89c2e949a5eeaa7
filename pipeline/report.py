"""The comparison of trained models: one row per model, as Markdown and JSON."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline import modeldir
from pipeline.errors import UserError

COLUMNS = ("name", "top1", "balanced_accuracy", "macro_f1", "fit_seconds", "eval_split")


def rows(model_dirs: list[Path]) -> list[dict]:
    """Rows of metrics, refusing models whose caches (fingerprints) or eval splits differ."""
    out, seen = [], {}
    for d in map(Path, model_dirs):
        info = modeldir.verify(d)
        metrics_path = d / "metrics.json"
        if not metrics_path.is_file():
            raise UserError(f"model directory {d} has no metrics.json")
        m = json.loads(metrics_path.read_text())
        key = (info["fingerprint"], m["eval_split"], m["n_eval"])
        seen.setdefault(key, d)
        if len(seen) > 1:
            raise UserError(f"cannot compare {d} with {next(iter(seen.values()))}: they were evaluated "
                            f"on different data (cache fingerprint, eval split or size differ)")
        out.append({"name": d.name, "classifier": info.get("classifier"), **{k: m[k] for k in COLUMNS[1:]},
                    **({"top5": m["top5"]} if "top5" in m else {})})
    return sorted(out, key=lambda r: -r["top1"])


def markdown(table: list[dict]) -> str:
    lines = ["| model | top-1 | balanced acc. | macro F1 | fit seconds | evaluated on |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['name']} | {r['top1']:.3f} | {r['balanced_accuracy']:.3f} | {r['macro_f1']:.3f} "
              f"| {r['fit_seconds']:.1f} | {r['eval_split']} |" for r in table]
    return "\n".join(lines) + "\n"


def compare(model_dirs: list[Path], out: Path) -> list[dict]:
    if not model_dirs:
        raise UserError("compare needs at least one model directory")
    table = rows(model_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "compare.md").write_text(markdown(table))
    return table
