"""`dvc repro` in a real temp git repo: the whole pipeline runs, fine-tuning included when enabled,
and changing one classifier's params reruns only that classifier, never the extraction or fine-tune."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def test_changing_a_classifier_param_skips_extraction_and_finetune(tmp_path):
    repo = tmp_path / "repo"
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    (repo / "data").mkdir()
    tiny_archive(repo / "data" / "fashion_mnist_demo.npz")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["extract"].update(image_size=64, workers=0)
    params["train"] = {name: params["train"][name] for name in ("logreg", "linear_svm", "knn")}
    params["finetune"]["enabled"] = ["ft_head"]
    params["finetune"]["ft_head"].update(epochs=1, image_size=32, batch_size=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=str(repo), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    sh("git", "init", "-q", cwd=repo, env=env)
    sh("dvc", "init", "-q", cwd=repo, env=env)
    first = sh("dvc", "repro", cwd=repo, env=env)
    assert "Running stage 'extract'" in first and "Running stage 'compare'" in first
    cache = repo / "features" / "features.h5"
    before = (digest(cache), cache.stat().st_mtime_ns)
    assert "Running stage 'finetune@ft_head'" in first
    rows = json.loads((repo / "reports" / "compare.json").read_text())
    assert sorted(r["name"] for r in rows) == ["ft_head", "knn", "linear_svm", "logreg"]
    assert all(r["train_seconds"] > 0 and r["total_seconds"] > 0 for r in rows)
    assert all(r["swap_speedup"] > 0 for r in rows if r["kind"] == "features")

    params["train"]["logreg"]["C"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    second = sh("dvc", "repro", cwd=repo, env=env)
    assert "Stage 'extract' didn't change, skipping" in second
    assert "Running stage 'train@logreg'" in second
    for name in set(params["train"]) - {"logreg"}:
        assert f"Running stage 'train@{name}'" not in second
    assert "Running stage 'finetune@ft_head'" not in second and "Running stage 'compare'" in second
    assert (digest(cache), cache.stat().st_mtime_ns) == before
    metrics = yaml.safe_load((repo / "models" / "logreg" / "metrics.json").read_text())
    assert metrics["hyperparameters"]["C"] == 0.5
