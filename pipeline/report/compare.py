"""The comparison of approaches: one row per model directory, as Markdown, JSON and a plot.

Models are ranked by the score their own selection used (val accuracy, or k-fold accuracy on train
without a test split; val macro AP for multi-label models, which never rank beside single-label ones), never
by the evaluation split; the best one is marked as selected and its evaluation score is the one to report.
Each selection score has a 95% interval, since on small evaluation sets a few images decide the order: a
Wilson interval for an accuracy, a bootstrap over the held-out images a multi-label model keeps for a macro
AP. Stage-two models pay their cache's extraction once and then seconds per classifier; a fine-tune run pays
its whole training every time. The table shows both costs and, for each classifier, how many times faster
swapping it is than the fastest fine-tune run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.features.spec import BackboneSpec
from pipeline.heads.metrics import accuracy_interval, macro_ap_interval
from pipeline.models.directory import KINDS, ModelDirectory, open_model
from pipeline.runtime.errors import InputError
from pipeline.runtime.files import replaced_atomically, write_atomically
from pipeline.runtime.printing import shown as escaped
from pipeline.storage.modeldir import read_held_out


def model_dirs(paths: list[Path]) -> list[tuple[str, Path]]:
    """(name, directory) of each model: a directory as given is named by its folder; a folder without
    model.json stands for every model directory below it, named by its path inside the folder
    (models/lite0_160/logreg -> lite0_160/logreg)."""
    out = []
    for p in map(Path, paths):
        if (p / "model.json").is_file() or not p.is_dir():
            out.append((p.name, p))
        else:
            found = sorted(f.parent for f in p.rglob("model.json"))
            if not found:
                raise InputError(f"{p} is neither a model directory nor a folder of them")
            out += [(d.relative_to(p).as_posix(), d) for d in found]
    return out


def _extractor(spec: BackboneSpec) -> str:
    """The backbone and the settings that change its vectors, e.g. 'efficientnet_lite0 224px tta'."""
    return " ".join([spec.name, f"{spec.preprocessing.image_size}px", *(["tta"] if spec.tta else [])])


MULTI_LABEL = ("macro_ap", "micro_ap", "macro_f1", "micro_f1", "subset_accuracy", "hamming_loss")   # its columns


def _row(name: str, d: Path) -> dict:
    model: ModelDirectory = open_model(d)   # model.json's facts and metrics.json are enough: no model is loaded
    m = model.metrics
    if not model.info.get("dataset"):
        raise InputError(f"{d}/model.json records no dataset identity; train it again with this version")
    if "val_score" not in m:
        raise InputError(f"{d / 'metrics.json'} records no val_score (the score its selection used); "
                        f"train it again with this version")
    if m["val_score"] is None:
        raise InputError(f"{d} kept its hyperparameters unscored ({m['selection']}): nothing to compare it by; "
                        f"label more images and train it again")
    cached = model.cache_fingerprint is not None   # else trained on the images: no extraction to share
    extract = m.get("extract_seconds") if cached else None   # None also for a cache made without timing
    total = None if cached and extract is None else m["fit_seconds"] + (extract or 0.0)
    row = {"name": name, "kind": model.kind.name, "approach": model.approach,
           "extractor": _extractor(model.backbone_spec), "selected": False,
           "multi_label": bool(model.info.get("multi_label")),
           "val_score": m["val_score"], "selection": m["selection"],
           "ece": m.get("ece"),   # None for models trained before calibration was measured
           "extract_seconds": extract, "train_seconds": m["fit_seconds"], "total_seconds": total,
           "swap_speedup": None, "eval_split": m["eval_split"], "n_eval": m["n_eval"],
           "_data": (model.info["dataset"], m["eval_split"], m["n_eval"]), "_cached": cached, "_path": d}
    if row["multi_label"]:   # macro AP: a bootstrap interval over the held-out images it was computed on
        labels, scores = read_held_out(d, model.info)
        return {**row, "val_interval": macro_ap_interval(labels, scores), "n_val_scored": len(labels),
                **{k: m[k] for k in MULTI_LABEL}}
    n_scored = m["n_val"] if m["selection"] == "val" else m["n_train"]   # k-fold scores every train image once
    return {**row, "val_interval": accuracy_interval(m["val_score"], n_scored), "n_val_scored": n_scored,
            "top1": m["top1"], "top1_interval": accuracy_interval(m["top1"], m["n_eval"]),
            "balanced_accuracy": m["balanced_accuracy"], "macro_f1": m["macro_f1"],
            **({"top5": m["top5"]} if "top5" in m else {})}


def rows(dirs: list[Path]) -> list[dict]:
    """One row per model, best selection score first, the first one selected; refuses to mix datasets
    or evaluation splits. Ties go to the cheaper model (total seconds), then the name."""
    out = []
    for name, d in model_dirs(dirs):
        row = _row(name, d)
        if out and row["multi_label"] != out[0]["multi_label"]:
            raise InputError(f"cannot compare {d} with {out[0]['_path']}: one is a multi-label model, the other "
                            f"single-label, and their scores (macro AP, top-1 accuracy) do not rank together")
        if out and row["_data"] != out[0]["_data"]:
            raise InputError(f"cannot compare {d} with {out[0]['_path']}: they were trained or evaluated on "
                            f"different data (dataset identity, eval split or its size differ)")
        out.append(row)
    finetuned = [r["train_seconds"] for r in out if not r["_cached"]]
    for r in out:
        if finetuned and r["_cached"]:
            r["swap_speedup"] = min(finetuned) / r["train_seconds"]
        del r["_data"], r["_cached"], r["_path"]
    out.sort(key=lambda r: (-r["val_score"], math.inf if r["total_seconds"] is None else r["total_seconds"],
                            r["name"]))
    out[0]["selected"] = True
    return out


def _cell(value, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def _speedup(value) -> str:
    """Whole multiples from 10x up; one decimal below, where a swap may also be slower (0.4x)."""
    return _cell(value, "{:.0f}×" if value is not None and value >= 10 else "{:.1f}×")


def _accuracy(value: float, interval) -> str:
    return f"{value:.3f} ({interval[0]:.3f}–{interval[1]:.3f})"


def verdict(table: list[dict]) -> str:
    """The selected model with its selection and evaluation scores, and whether the runner-up is a tie."""
    best = table[0]
    split = best["eval_split"]
    if best["multi_label"]:
        evaluated = f"{split} macro AP {best['macro_ap']:.3f} and macro F1 {best['macro_f1']:.3f}"
        intervals = "95% percentile-bootstrap intervals over the images scored (1,000 resamples)"
    else:
        evaluated = f"{split} top-1: {_accuracy(best['top1'], best['top1_interval'])}"
        intervals = "95% Wilson intervals"
    lines = [f"Selected: **{best['name']}** ({best['extractor']}, {best['approach']}), the best selection score: "
             f"{_accuracy(best['val_score'], best['val_interval'])} on {best['n_val_scored']} images "
             f"({best['selection']}). Its {evaluated} on {best['n_eval']} images. Models are ranked by the score "
             f"their selection used, never by {split}; intervals are {intervals}."]
    if len(table) > 1:
        second = table[1]
        tie = second["val_score"] >= best["val_interval"][0]
        lines.append(f"The runner-up, {second['name']} ({second['val_score']:.3f}), is "
                     + ("within the selected model's 95% interval: the selection set cannot tell the two apart."
                        if tie else "outside the selected model's 95% interval."))
    return "\n\n".join(lines)


def _evaluated(r: dict) -> list[str]:
    """A row's cells of its evaluation scores."""
    if r["multi_label"]:
        return [f"{r[k]:.3f}" for k in MULTI_LABEL]
    return [_accuracy(r["top1"], r["top1_interval"]), f"{r['balanced_accuracy']:.3f}", f"{r['macro_f1']:.3f}"]


def markdown(table: list[dict]) -> str:
    """The table as markdown, then the verdict; the swap speed-up column only when there is a fine-tune
    run to compare with."""
    swaps = any(r["swap_speedup"] for r in table)
    split = table[0]["eval_split"]
    scored = (["selection score: macro AP (95% CI)", "scored on", f"{split} macro AP", "micro AP", "macro F1",
               "micro F1", "subset acc.", "Hamming loss"] if table[0]["multi_label"] else
              ["selection score (95% CI)", "scored on", f"{split} top-1 (95% CI)", "balanced acc.", "macro F1"])
    header = ["selected", "model", "extractor", "approach", *scored, "ECE", "extraction s", "train s", "total s",
              *(["swap speed-up"] if swaps else [])]
    cells = [["✓" if r["selected"] else "", r["name"], r["extractor"], r["approach"],
              _accuracy(r["val_score"], r["val_interval"]), r["selection"], *_evaluated(r), _cell(r["ece"], "{:.3f}"),
              _cell(r["extract_seconds"]), _cell(r["train_seconds"]), _cell(r["total_seconds"]),
              *([_speedup(r["swap_speedup"])] if swaps else [])]
             for r in table]
    align = [":-:", "---", "---", "---", *["---:"] * (len(header) - 4)]
    align[5] = "---"
    lines = ["| " + " | ".join(row) + " |" for row in (header, *cells)]
    lines.insert(1, "|" + "|".join(align) + "|")
    lines.append("\n" + verdict(table))
    lines.append("\nExtraction runs once per cache and is shared by every classifier row on it."
                 + (" Swap speed-up: the fastest fine-tune run's train time over the classifier's, i.e. how much "
                    "cheaper trying another classifier on the cache is than another fine-tune run." if swaps else ""))
    return "\n".join(lines) + "\n"


def place_labels(ax, points: list[tuple[float, float, str]]) -> list:
    """Name each (x, y, text) point in a column right of the axes, in the order of the points' heights,
    each name joined to its point by a thin line: names never overlap, however crowded the points."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    axes_height = ax.get_window_extent(renderer).height
    fontsize = min(8.0, axes_height * 72 / fig.dpi / (1.4 * max(len(points), 1)))   # all of them fit
    step = fontsize * 1.4 * fig.dpi / 72 / axes_height      # one line of text, in axes fractions
    to_axes = ax.transData + ax.transAxes.inverted()
    ordered = sorted(points, key=lambda p: (p[1], p[0]))
    heights = spread([float(to_axes.transform((x, y))[1]) for x, y, _ in ordered], step)
    return [ax.annotate(text, (x, y), xytext=(1.02, h), textcoords="axes fraction", fontsize=fontsize,
                        va="center", annotation_clip=False,
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6", "shrinkA": 0, "shrinkB": 3})
            for (x, y, text), h in zip(ordered, heights)]


def spread(wanted: list[float], step: float) -> list[float]:
    """Heights as close to the ascending `wanted` as they can be while at least `step` apart and within
    [step / 2, 1 - step / 2]: pushed up from the bottom, then down from the top."""
    heights: list[float] = []
    for w in wanted:
        heights.append(max(w, step / 2, heights[-1] + step if heights else -1.0))
    ceiling = 1 - step / 2
    for i in reversed(range(len(heights))):
        heights[i] = min(heights[i], ceiling)
        ceiling = heights[i] - step
    return heights


def figure(table: list[dict]):
    """Selection score (with its 95% interval) against total compute seconds, one labelled point per
    model, the selected one starred; the legend names only the kinds present."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 5))
    shown = [dict(r, name=escaped(r["name"])) for r in table   # a name's odd bytes would stop the font
             if r["total_seconds"] is not None]
    for (kind, cls), marker, colour in zip(KINDS.items(), "os^D", ("C0", "C1", "C2", "C3")):
        label = cls.what
        group = [r for r in shown if r["kind"] == kind]
        if not group:
            continue
        xs, ys = [r["total_seconds"] for r in group], [r["val_score"] for r in group]
        err = [[r["val_score"] - r["val_interval"][0] for r in group], [r["val_interval"][1] - r["val_score"]
                                                                         for r in group]]
        ax.errorbar(xs, ys, yerr=err, fmt=marker, color=colour, ecolor=colour, elinewidth=0.6, capsize=2,
                    alpha=0.8, label=label)
    best = next((r for r in shown if r["selected"]), None)
    if best is not None:
        ax.scatter([best["total_seconds"]], [best["val_score"]], marker="*", s=220, color="gold",
                   edgecolors="black", zorder=3, label=f"selected: {best['name']}")
    ax.set_xscale("log")
    seconds = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")   # 20, 30, 40 rather than 2x10^1
    ax.xaxis.set_major_formatter(seconds)
    ax.xaxis.set_minor_formatter(seconds)
    ax.set_xlabel("total compute seconds (log scale)")
    ax.set_ylabel(f"selection score ({'macro AP' if table[0]['multi_label'] else 'top-1'}, 95% interval)")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=8, loc="lower right")
    widest = max((len(r["name"]) for r in shown), default=0) * 8 * 0.6 / 72    # inches, names at 8 pt
    fig.tight_layout(rect=(0, 0, 1 - min(0.5, (widest + 0.3) / fig.get_figwidth()), 1))   # room for the names
    place_labels(ax, [(r["total_seconds"], r["val_score"], r["name"]) for r in shown])
    return fig


def compare(model_dirs: list[Path], out: Path) -> list[dict]:
    """Write compare.md, compare.json and compare.png to the folder `out`, each replaced whole (a folder
    shared with other reports, such as reports/, so not replaced as one)."""
    if not model_dirs:
        raise InputError("compare needs at least one model directory")
    table = rows(model_dirs)
    import matplotlib.pyplot as plt
    fig = figure(table)
    out = Path(out)
    write_atomically(out / "compare.json", json.dumps(table, indent=2) + "\n")
    write_atomically(out / "compare.md", markdown(table))
    with replaced_atomically(out / "compare.png") as png:
        fig.savefig(png, dpi=100, format="png")
    plt.close(fig)
    return table
