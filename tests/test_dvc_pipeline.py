"""`dvc repro` in a real temp git repo: the whole extractor sweep runs (two extractors x two classifiers,
fine-tuning included when enabled); changing one extractor's settings reruns only its cache and the models
on it, changing one classifier's params reruns only that classifier on each cache, and `compare` selects by
the val score."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import COLOURS, ROOT, tiny_image


def sh(*cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def tiny_archive(path: Path) -> None:
    """A demo archive in the embedded dataset's format: 3 classes, 28x28 grayscale."""
    images, labels, splits = [], [], []
    for label, colour in enumerate(COLOURS.values()):
        for split, n in (("train", 6), ("val", 3), ("test", 3)):
            for i in range(n):
                images.append(np.asarray(tiny_image(colour, 100 * label + 10 * len(splits) + i, 28).convert("L")))
                labels.append(label)
                splits.append(split)
    np.savez_compressed(path, images=np.stack(images), labels=np.array(labels), splits=np.array(splits),
                        classes=np.array(list(COLOURS)))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.slow
def test_an_extractor_sweep_reruns_only_what_changed_and_selects_by_val(tmp_path):
    repo = tmp_path / "repo"
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name)   # with its bytecode (`make bytecode`), still valid
    shutil.copy(ROOT / "dvc.yaml", repo)
    (repo / "data").mkdir()
    tiny_archive(repo / "data" / "fashion_mnist_demo.npz")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["extract"].update(workers=0)
    params["extractors"] = {"small": {"image_size": 32}, "large": {"image_size": 48}}
    params["train"] = {"logreg": params["train"]["logreg"], "knn": params["train"]["knn"]}
    params["finetune"]["enabled"] = ["ft_head"]
    params["finetune"]["ft_head"].update(epochs=1, image_size=32, batch_size=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=str(repo), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    sh("git", "init", "-q", cwd=repo, env=env)
    sh("dvc", "init", "-q", cwd=repo, env=env)
    first = ran(sh("dvc", "repro", cwd=repo, env=env))
    models = {f"{e}-{c}" for e in ("small", "large") for c in ("logreg", "knn")}
    assert first == {"prepare", "extract@small", "extract@large", "finetune@ft_head", "compare", "audit@small",
                     "audit@large", *(f"train@{m}" for m in models)}
    shown = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True)
    scores = next(iter(json.loads(shown.stdout).values()))["data"]["models/small/logreg/scores.json"]["data"]
    metrics = json.loads((repo / "models" / "small" / "logreg" / "metrics.json").read_text())
    assert scores == {k: metrics[k] for k in ("top1", "balanced_accuracy", "macro_f1", "val_score")}
    table = sh("dvc", "metrics", "show", cwd=repo, env=env)
    assert max(map(len, table.splitlines())) <= 120, table   # four scores a model; the audit's are no metric
    assert json.loads((repo / "reports" / "audit" / "small" / "summary.json").read_text())["images"] == 36
    assert (repo / "reports" / "audit" / "small" / "index.html").is_file()
    rows = json.loads((repo / "reports" / "compare.json").read_text())
    assert sorted(r["name"] for r in rows) == ["ft_head", "large/knn", "large/logreg", "small/knn", "small/logreg"]
    assert [r["selected"] for r in rows].count(True) == 1 and rows[0]["selected"]
    assert rows[0]["val_score"] == max(r["val_score"] for r in rows)
    for r in rows:
        if r["kind"] == "features":
            size = 32 if r["name"].startswith("small/") else 48
            assert r["extractor"] == f"efficientnet_lite0 {size}px" and r["extract_seconds"] > 0
            assert r["total_seconds"] == r["extract_seconds"] + r["train_seconds"] and r["swap_speedup"] > 0
    small = repo / "features" / "small.h5"
    before = (digest(small), small.stat().st_mtime_ns)

    params["extractors"]["large"]["image_size"] = 40      # one extractor's settings and one classifier's
    params["train"]["logreg"]["C"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    second = ran(sh("dvc", "repro", cwd=repo, env=env))
    assert second == {"extract@large", "train@large-logreg", "train@large-knn", "train@small-logreg", "audit@large",
                      "compare"}
    assert (digest(small), small.stat().st_mtime_ns) == before
    rows = json.loads((repo / "reports" / "compare.json").read_text())
    assert {r["extractor"] for r in rows if r["name"].startswith("large/")} == {"efficientnet_lite0 40px"}
    assert [r["selected"] for r in rows].count(True) == 1 and rows[0]["val_score"] == max(r["val_score"] for r in rows)
    details = json.loads((repo / "models" / "small" / "logreg" / "details.json").read_text())
    assert details["hyperparameters"]["C"] == 0.5
