"""Both expensive stages on two real processes (torchrun, Gloo on the CPU)."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.runtime.errors import InputError
from pipeline.storage import statefile
from pipeline.tuning.training import CHECKPOINT
from tests.conftest import COLOURS, ROOT, cli_in_process, interrupt_when_written, make_image_folder, run_cli, tiny_image

SMALL = ("--image-size", 64, "--workers", 0)


def torchrun_command(*args) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
            "-m", "pipeline", *map(str, args)]


def torchrun(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_command(*args), env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def rows(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        out = {"attrs": {k: v for k, v in f.attrs.items() if k not in ("created", "extract_seconds", "checksum")},
               "skipped": f["skipped"][:].tolist()}
        for split in ("train", "val", "test"):
            if split in f:
                out[split] = {name: f[split][name][:] for name in ("features", "labels", "paths", "sha256")}
    return out


@pytest.mark.slow
def test_two_process_extraction_equals_one_process_and_reuses(tmp_path):
    images = make_image_folder(tmp_path / "images", {"train": 6, "val": 2, "test": 2})
    (images / "train" / "red" / "broken.png").write_bytes(b"not a png")
    (images / "train" / "red" / "notes.txt").write_text("not an image")
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    cli_in_process("extract", images, "--out", one, *SMALL, "--dtype", "float32", "--quiet", check=True)
    torchrun("extract", images, "--out", two, *SMALL, "--dtype", "float32", "--quiet")

    a, b = rows(one), rows(two)
    assert a["attrs"] == b["attrs"]          # fingerprint and every attribute but the timings
    assert a["skipped"] == b["skipped"] and len(a["skipped"]) == 2
    for split in ("train", "val", "test"):
        for name in ("labels", "paths", "sha256"):
            assert a[split][name].tolist() == b[split][name].tolist(), (split, name)
        # the same vectors up to float32 rounding: the ranks batch the images differently
        np.testing.assert_allclose(a[split]["features"], b[split]["features"], rtol=1e-4, atol=1e-4)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["images", "one.h5", "one.manifest.csv", "two.h5", "two.manifest.csv"]   # shards deleted

    (images / "val" / "green" / "val_0.png").unlink()
    tiny_image(COLOURS["blue"], 999).save(images / "train" / "blue" / "new.png")
    proc = run_cli("extract", images, "--out", two, *SMALL, "--dtype", "float32", "--nproc", 2, check=True)
    assert "(1 computed, 29 reused)" in proc.stderr
    c = rows(two)
    for split in ("train", "val", "test"):
        before = dict(zip(b[split]["sha256"].tolist(), b[split]["features"]))
        for digest, vector in zip(c[split]["sha256"].tolist(), c[split]["features"]):
            if digest in before:
                assert np.array_equal(vector, before[digest])
    assert "train/blue/new.png" in c["train"]["paths"].astype(str).tolist()
    assert "val/green/val_0.png" not in c["val"]["paths"].astype(str).tolist()


@pytest.mark.slow
def test_ddp_finetuning_resumes_from_a_checkpoint_and_predicts(tmp_path):
    images = make_image_folder(tmp_path / "images", {"train": 6, "val": 2, "test": 2})
    out = tmp_path / "model"
    settings = ("finetune", images, "--out", out, *SMALL, "--weights", "none", "--epochs", 3, "--batch-size", 4,
                "--lr", 0.01, "--no-random-crop", "--quiet")
    checkpoint = out / CHECKPOINT
    # interrupted as soon as the first epoch's checkpoint exists
    # (SIGTERM: torchrun stops its workers and waits for them)
    interrupt_when_written(torchrun_command(*settings, "--checkpoint"), checkpoint, signal.SIGTERM)
    saved = statefile.load(checkpoint)
    done = len(saved["history"])
    assert done >= 1 and not (out / "model.json").exists()

    torchrun(*settings, "--resume", checkpoint)
    with open(out / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert [int(h["epoch"]) for h in history] == [1, 2, 3]
    assert float(history[0]["val_acc"]) == saved["history"][0]["val_acc"]
    # the cosine schedule carried on from the checkpoint; the rate is lr x 2 processes
    for h in history:
        assert math.isclose(float(h["lr"]), 0.02 * (1 + math.cos(math.pi * (int(h["epoch"]) - 1) / 3)) / 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["n_train"] == 18 and metrics["n_val"] == 6

    other = cli_in_process(*settings[:-1], "--epochs", 4, "--resume", checkpoint)   # one process: lr unscaled too
    assert other.returncode == 2 and "epochs: 3 != 4; lr: 0.02 != 0.01" in other.stderr

    predicted = cli_in_process("predict", out, images / "test" / "red", "--format", "csv", "--top-k", 1, check=True)
    table = list(csv.DictReader(predicted.stdout.splitlines()))
    assert [Path(r["path"]).name for r in table] == ["test_0.png", "test_1.png"]
    assert all(r["class"] in COLOURS and not r["error"] for r in table)


def test_shards_concatenate_to_the_single_process_file_even_when_some_are_empty(tmp_path):
    """In one process: four shards of splits smaller than four; the first holds no rows at all."""
    from pipeline.data.folders import scan
    from pipeline.features.backbones.loading import build_backbone
    from pipeline.features.extract import extract
    from pipeline.features.settings import ExtractSettings
    from pipeline.features.sharded import concatenate, shard, shard_path

    images = make_image_folder(tmp_path / "images", {"train": 1, "val": 1}, classes=("red", "green"))
    (images / "val" / "red" / "broken.png").write_bytes(b"not a png")
    dataset = scan(images, 0.15, 0.15, 0)
    backbone = build_backbone("efficientnet_lite0", "none", None, 64)
    single = tmp_path / "single.h5"
    settings = ExtractSettings(device="cpu", dtype="float32", workers=0)
    extract(dataset, backbone, single, settings, quiet=True)
    out = tmp_path / "joined.h5"
    shards = [shard_path(out, r, 4) for r in range(4)]
    counts = []
    for r, path in enumerate(shards):
        part = shard(dataset, r, 4)
        counts.append(len(part.samples))
        extract(part, backbone, path, settings, quiet=True, shard_of=out)
    assert counts == [0, 2, 1, 2]   # train 0+1+0+1, val 0+1+1+1
    concatenate(dataset, shards, out)

    a, b = rows(single), rows(out)
    assert a["attrs"] == b["attrs"] and a["skipped"] == b["skipped"] and len(a["skipped"]) == 1
    assert "test" not in a and "test" not in b
    for split in ("train", "val"):
        assert a[split]["paths"].tolist() == b[split]["paths"].tolist()
        np.testing.assert_allclose(a[split]["features"], b[split]["features"], rtol=1e-4, atol=1e-4)
    assert not any(p.exists() for p in shards)

    joined = out.read_bytes()     # a shard damaged before the merge is refused; the merged file stays as it was
    for r, path in enumerate(shards):
        extract(shard(dataset, r, 4), backbone, path, settings, quiet=True, shard_of=out)
    with h5py.File(shards[3], "r+") as f:
        f["val/features"][0, 0] += 1
    with pytest.raises(InputError, match=f"^{shards[3]}: val/features does not match the digest recorded"):
        concatenate(dataset, shards, out)
    assert out.read_bytes() == joined and not any(p.exists() for p in shards)


@pytest.mark.parametrize("option, words", [(["--compute-stats"], "--compute-stats needs the whole training split"),
                                           (["--batch-size", 0], "--batch-size must be at least 1, got 0")])
def test_what_every_rank_would_refuse_is_refused_before_launching(image_folder, tmp_path, option, words):
    proc = run_cli("extract", image_folder, "--out", tmp_path / "f.h5", *option, "--nproc", 2)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and words in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob("f*"))


@pytest.mark.slow
def test_an_error_in_the_ranks_is_exit_code_2_through_nproc(tmp_path):
    """torchrun exits 1 whatever failed; `--nproc` returns the ranks' own code, and the error every rank
    met appears once, without torchrun's report. Nothing is written."""
    images = make_image_folder(tmp_path / "images", {"train": 4, "val": 1})
    proc = run_cli("extract", images, "--out", tmp_path / "f.h5", "--weights", tmp_path / "gone.pth", "--nproc", 2)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: weights file {tmp_path / 'gone.pth'} does not exist"
    assert not list(tmp_path.glob("f*"))


@pytest.mark.slow
def test_a_warning_and_an_error_after_the_shards_through_nproc(tmp_path):
    """The warning about the data appears once (rank 0's), and a folder whose every training image is
    unusable ends with the same error as in one process, leaving neither a cache nor shards."""
    images = make_image_folder(tmp_path / "images", {"train": 4, "test": 1})      # no val: a warning
    for path in (images / "train").rglob("*.*"):
        path.write_text("not an image")
    proc = run_cli("extract", images, "--out", tmp_path / "f.h5", *SMALL, "--quiet", "--nproc", 2)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"warning: {images} has no val folder"), proc.stderr
    assert lines[1].startswith("error: no training image could be used (")
    assert sorted(p.name for p in tmp_path.glob("f*")) == []   # no manifest, no lock file of a refused run


@pytest.mark.parametrize("code, line", [
    ("raise SystemExit(3)", "error: rank 0 stopped with exit code 3"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "error: rank 0 stopped with signal SIGKILL")])
def test_a_rank_that_fails_without_its_own_error_line_gets_one(code, line):
    proc = subprocess.run([sys.executable, "-m", "pipeline.runtime.distributed", "--standalone", "--nproc_per_node=1",
                           "--no-python", sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.strip() == line


def test_ranks_torchrun_stops_because_another_failed_get_no_line():
    """Rank 1 fails; torchrun stops rank 0 with SIGTERM, which is a consequence and is not reported."""
    code = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(120)"
    proc = subprocess.run([sys.executable, "-m", "pipeline.runtime.distributed", "--standalone", "--nproc_per_node=2",
                           "--no-python", sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=100)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: rank 1 stopped with exit code 3"


def test_a_rank_stopped_by_sigterm_alone_is_reported_and_recorded_errors_are_not():
    from types import SimpleNamespace

    from pipeline.runtime.distributed import unexplained_failures
    term, error, crash = (SimpleNamespace(exitcode=c) for c in (-signal.SIGTERM, 2, 3))
    assert unexplained_failures({0: error, 1: term}) == {}   # rank 1 stopped before recording its own
    assert unexplained_failures({0: term, 1: crash}) == {1: crash}
    assert unexplained_failures({0: term}) == {0: term}              # stopped from outside


@pytest.mark.slow
def test_a_run_on_a_locked_output_is_refused_by_every_rank(tmp_path):
    from pipeline.runtime.files import output_lock
    images = make_image_folder(tmp_path / "images", {"train": 2, "val": 1})
    out = tmp_path / "f.h5"
    with output_lock(out):   # another run holds the output
        proc = subprocess.run(torchrun_command("extract", images, "--out", out, *SMALL, "--quiet"),
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("is being written by another run") == 2, proc.stderr   # both ranks say why
    assert not out.exists() and not list(tmp_path.glob("f.rank*"))
