"""The comparison of approaches: one row per model directory, as Markdown, JSON and a plot.

Stage-two models pay the one-off extraction once and then seconds per classifier; a fine-tune
run pays its whole training every time. The table shows both costs and, for each classifier,
how many times faster swapping it is than the fastest fine-tune run.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.runtime.errors import UserError
from pipeline.storage import modeldir


def model_dirs(paths: list[Path]) -> list[Path]:
    """Model directories as given; a folder without model.json stands for its sub-folders that have one."""
    out = []
    for p in map(Path, paths):
        if (p / "model.json").is_file() or not p.is_dir():
            out.append(p)
        else:
            found = sorted(d for d in p.iterdir() if (d / "model.json").is_file())
            if not found:
                raise UserError(f"{p} is neither a model directory nor a folder of them")
            out += found
    return out


def _row(d: Path) -> dict:
    info = modeldir.verify(d)
    metrics_path = d / "metrics.json"
    if not metrics_path.is_file():
        raise UserError(f"model directory {d} has no metrics.json")
    if not info.get("dataset"):
        raise UserError(f"{d}/model.json records no dataset identity; train it again with this version")
    m = json.loads(metrics_path.read_text())
    cached = info["kind"] == "features"
    extract = m.get("extract_seconds") if cached else None   # None for a cache made without timing
    total = None if cached and extract is None else m["fit_seconds"] + (extract or 0.0)
    return {"name": d.name, "kind": info["kind"], "approach": info.get("classifier") or info.get("strategy"),
            "top1": m["top1"], "balanced_accuracy": m["balanced_accuracy"], "macro_f1": m["macro_f1"],
            "extract_seconds": extract, "train_seconds": m["fit_seconds"], "total_seconds": total,
            "swap_speedup": None, "eval_split": m["eval_split"], **({"top5": m["top5"]} if "top5" in m else {}),
            "_data": (info["dataset"], m["eval_split"], m["n_eval"]), "_cache": info["fingerprint"]}


def rows(dirs: list[Path]) -> list[dict]:
    """One row per model, refusing to mix datasets, eval splits, or feature caches."""
    out = []
    for d in model_dirs(dirs):
        row = _row(d)
        if out and row["_data"] != out[0]["_data"]:
            raise UserError(f"cannot compare {d} with {out[0]['name']}: they were trained or evaluated on "
                            f"different data (dataset identity, eval split or its size differ)")
        other = next((r for r in out if r["kind"] == "features"), None)
        if row["kind"] == "features" and other and row["_cache"] != other["_cache"]:
            raise UserError(f"cannot compare {d} with {other['name']}: their feature caches differ")
        out.append(row)
    finetuned = [r["train_seconds"] for r in out if r["kind"] == "finetuned"]
    for r in out:
        del r["_data"], r["_cache"]
        if finetuned and r["kind"] == "features":
            r["swap_speedup"] = min(finetuned) / r["train_seconds"]
    return sorted(out, key=lambda r: -r["top1"])


def _cell(value, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def _speedup(value) -> str:
    """Whole multiples from 10x up; one decimal below, where a swap may also be slower (0.4x)."""
    return _cell(value, "{:.0f}×" if value is not None and value >= 10 else "{:.1f}×")


def markdown(table: list[dict]) -> str:
    """The table as markdown; the swap speed-up column only when there is a fine-tune run to compare with."""
    swaps = any(r["swap_speedup"] for r in table)
    header = ["model", "approach", "top-1", "balanced acc.", "macro F1", "extraction s", "train s", "total s",
              *(["swap speed-up"] if swaps else []), "evaluated on"]
    cells = [[r["name"], r["approach"], f"{r['top1']:.3f}", f"{r['balanced_accuracy']:.3f}", f"{r['macro_f1']:.3f}",
              _cell(r["extract_seconds"]), _cell(r["train_seconds"]), _cell(r["total_seconds"]),
              *([_speedup(r["swap_speedup"])] if swaps else []), r["eval_split"]] for r in table]
    align = ["---", "---", *["---:"] * (len(header) - 3), "---"]
    lines = ["| " + " | ".join(row) + " |" for row in (header, *cells)]
    lines.insert(1, "|" + "|".join(align) + "|")
    if swaps:
        lines.append("\nExtraction runs once per cache and is shared by every classifier row. Swap speed-up: "
                     "the fastest fine-tune run's train time over the classifier's, i.e. how much cheaper "
                     "trying another classifier on the cache is than another fine-tune run.")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> None:
    """Top-1 accuracy against total compute seconds, one labelled point per approach."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in table:
        if r["total_seconds"] is None:
            continue
        fine = r["kind"] == "finetuned"
        ax.scatter(r["total_seconds"], r["top1"], marker="s" if fine else "o", color="C1" if fine else "C0")
        ax.annotate(r["name"], (r["total_seconds"], r["top1"]), textcoords="offset points", xytext=(5, 3),
                    fontsize=8)
    ax.scatter([], [], marker="o", color="C0", label="features cache + classifier (incl. extraction)")
    ax.scatter([], [], marker="s", color="C1", label="fine-tune")
    ax.set_xscale("log")
    ax.set_xlabel("total compute seconds (log scale)")
    ax.set_ylabel(f"top-1 on {table[0]['eval_split']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(model_dirs: list[Path], out: Path) -> list[dict]:
    """Write compare.md, compare.json and compare.png to `out`."""
    if not model_dirs:
        raise UserError("compare needs at least one model directory")
    table = rows(model_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "compare.md").write_text(markdown(table))
    plot(table, out / "compare.png")
    return table
