"""Stage one streams to disk (peak memory independent of the dataset size) and `pipeline bench` runs end to end."""
from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys

import h5py
import pytest

from tests.conftest import ROOT, cli_in_process, make_image_folder

FEATURE_DIM = 25088   # vgg16's flattened conv features: 100 kB per image, so holding them would show

# In a fresh process: extract the smaller folder twice (the first run warms up allocators and caches),
# note the peak resident memory, extract the larger folder, note the peak, extract it again reusing every
# vector of that cache, note the peak. Each line: the peak and the images reused.
PEAKS = """
import json, resource, sys
from pathlib import Path
from pipeline.features.backbones.loading import build_backbone
from pipeline.data.folders import scan
from pipeline.features.extract import extract
from pipeline.features.settings import ExtractSettings
backbone = build_backbone("vgg16", "none", "avgpool", image_size=32)
settings = ExtractSettings(batch_size=16, device="cpu", dtype="float32", workers=0, engine="torch")
for folder, out in zip(sys.argv[1::2], sys.argv[2::2]):
    summary = extract(scan(Path(folder), 0, 0), backbone, Path(out), settings, quiet=True)
    print(json.dumps([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, summary.reused]))
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    """Fresh and reusing runs alike: the writer's slabs (256 rows here) and queue are full in the smaller
    run already, so the larger one needs no more memory. Batches of 16 keep what the queue holds (4
    batches, 6.4 MB) small next to the allowance: how full it gets depends on the machine's load."""
    small, large = 128, 416   # images per class: the smaller run fills a slab (256 rows)
    folders = [make_image_folder(tmp_path / f"images{n}", {"train": n}, classes=("red", "blue"))
               for n in (small, large)]
    runs = [folders[0], tmp_path / "a.h5", folders[0], tmp_path / "b.h5", folders[1], tmp_path / "c.h5",
            folders[1], tmp_path / "c.h5"]
    proc = subprocess.run([sys.executable, "-c", PEAKS, *map(str, runs)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert proc.returncode == 0, proc.stderr
    (_, _), (peak_small, _), (peak_large, fresh), (peak_reused, reused) = map(json.loads, proc.stdout.splitlines())
    assert (fresh, reused) == (0, 2 * large)
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["train/features"].shape == (2 * large, FEATURE_DIM)
    # holding the extra vectors in memory would cost this much; streaming must cost under half of it (three
    # test processes on two cores once made 36 MB of growth; two, 0-0.5 MB)
    held = 2 * (large - small) * FEATURE_DIM * 4
    assert peak_reused - peak_small < held / 2, (peak_small, peak_large, peak_reused, held)


def test_bench_runs_end_to_end_and_writes_json(tmp_path):
    images = make_image_folder(tmp_path / "images", {"train": 6}, classes=("red", "blue"), ext=".jpg")
    out = tmp_path / "bench.json"
    proc = cli_in_process("bench", images, "--out", out, "--image-size", 32, "--batch-size", 4, "--repeats", 1,
                   "--device", "cpu", "--workers", 0, "--tutorial-images", 4, check=True)
    rows = json.loads(out.read_text())
    assert [r["engine"] for r in rows] == ["torch", "onnxruntime"]     # side by side on a CPU
    for result in rows:
        assert result["images"] == 12 and result["device"] == "cpu" and result["precision"] == "float32"
        assert result["decoder"] == "PIL" and result["tutorial_images"] == 4     # the tutorial loop on 4 of 12
        for name in ("tutorial", "extract", "model_only"):
            assert result["images_per_s"][name] > 0
        assert set(result["startup_s"]) == {"extract"} and result["startup_s"]["extract"] > 0
        assert result["ratios"]["extract_vs_tutorial"] == result["images_per_s"]["extract"] / \
            result["images_per_s"]["tutorial"]
    assert rows[0]["images_per_s"]["tutorial"] == rows[1]["images_per_s"]["tutorial"]
    assert rows[1]["ratios"]["model_only_vs_torch"] == rows[1]["images_per_s"]["model_only"] / \
        rows[0]["images_per_s"]["model_only"]
    assert "| efficientnet_lite0 | cpu (" in proc.stdout and "| onnxruntime | PIL |" in proc.stdout


@pytest.mark.slow
def test_benchmark_script_compares_batch_sizes_and_defaults_to_extracts(tmp_path):
    """benchmarks/bench.py times each batch size given (and extract's own default when none is) on a
    folder it generates, and writes one JSON row per run."""
    out = tmp_path / "rows.json"
    script = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--data", tmp_path / "jpegs", "--images", 8,
              "--image-size", 32, "--repeats", 1, "--workers", 0, "--device", "cpu", "--no-tutorial"]
    for sizes, expected in ((["--batch-size", 2, 4], [2, 4]), ([], [16])):
        subprocess.run([str(a) for a in script + sizes + ["--out", out]], cwd=ROOT, check=True,
                       capture_output=True, timeout=300)
        rows = json.loads(out.read_text())
        assert [r["batch_size"] for r in rows] == [b for b in expected for _ in ("torch", "onnxruntime")]
        assert all(r["images"] == 8 for r in rows)
        assert all(r["images_per_s"]["extract"] > 0 for r in rows)


@pytest.mark.slow
def test_the_gpu_sessions_scripts_run_their_code_on_a_cpu(tmp_path, capsys, monkeypatch):
    """benchmarks/gpu_parts.py and compare_paths.py, which a GPU session runs from gpu_session.sh, run the
    same code on CPU tensors: every part is timed, and the fast path (each decoder, then the batched resize)
    gives the CPU path's features. (In this process: they only differ from the command line by argv.)"""
    photos = tmp_path / "photos"

    def script(name: str, *args) -> str:
        monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
        runpy.run_path(str(ROOT / "benchmarks" / name), run_name="__main__")
        return capsys.readouterr().out

    script("make_images.py", photos, "--images", 16, "--jobs", 1)
    parts = script("gpu_parts.py", photos, "--images", 16, "--workers", 1, "--batch-size", 8, "--device", "cpu")
    for part in (r"read bytes in 1 workers.*: [\d,]+ images/s", r"torchvision decode_jpeg on cpu.*: [\d,]+ images/s",
                 r"resampling matrices.*: [\d,]+ images/s", r"host time only, [\d.]+ ms and \d+ torch operations",
                 r"one interpolate per image.*: [\d,]+ images/s", r"one roi_align.*: [\d,]+ images/s",
                 r"all three in gpu_batches.*: [\d,]+ images/s"):
        assert re.search(part, parts), (part, parts)
    compared = script("compare_paths.py", photos, "--images", 16, "--device", "cpu", "--precision", "float32")
    cosines = re.findall(r"cosine similarity min ([\d.]+)", compared)
    assert len(cosines) == len(re.findall(r"decoding, float32\)", compared)) >= 1, compared
    assert min(map(float, cosines)) > 0.9999, compared
    resized = script("compare_paths.py", photos, "--images", 16, "--resize-only")
    identical = float(re.search(r"pixels: ([\d.]+)% identical", resized).group(1))
    assert identical > 99.9 and float(re.search(r"cosine similarity min ([\d.]+)", resized).group(1)) > 0.9999
