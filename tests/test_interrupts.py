"""Interrupted and concurrent runs of the real `pipeline extract`: SIGKILL at random points, Ctrl-C, a
second writer, a full disk. Each run is a subprocess; the finished file must equal one made in one go."""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.features.extract import extract_folder
from pipeline.features.settings import ExtractSettings
from pipeline.storage.cache import FeatureWriter
from tests.conftest import ROOT, embedder_calls, make_image_folder, run_cli
from tests.test_bad_input import one_line_error

OPTIONS = ("--image-size", 64, "--workers", 0, "--dtype", "float32", "--batch-size", 2)


class Run:
    """A real `pipeline extract` subprocess whose progress bar (stderr) is read as it runs."""

    def __init__(self, images: Path, out: Path, **popen):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", "extract", str(images), "--out", str(out),
                                      *map(str, OPTIONS)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, **popen)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=lambda: self.chunks.extend(iter(
            lambda: os.read(self.proc.stderr.fileno(), 4096), b"")))
        self.reader.start()

    @property
    def stderr(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for_progress(self, images: int, timeout: float = 120) -> None:
        """Until the progress bar shows at least `images` images done: a kill point that does not
        depend on how fast this machine is."""
        end = time.monotonic() + timeout
        while not [n for n in map(int, re.findall(r"\| *(\d+)/43 ", self.stderr)) if n >= images]:
            assert self.proc.poll() is None, f"run ended before {images} images:\n{self.stderr}"
            assert time.monotonic() < end, f"no progress to {images} images:\n{self.stderr}"
            time.sleep(0.002)

    def wait(self, timeout: float = 300) -> int:
        self.proc.wait(timeout)
        self.reader.join()
        return self.proc.returncode


def checkpointed_rows(tmp: Path) -> int | None:
    """Rows an interrupted run left at its last checkpoint: 0 when it had none, None when the kill
    hit a flush and left the file unreadable (the next run starts over)."""
    try:
        f = h5py.File(tmp, "r")
    except OSError:
        return None
    with f:
        return sum(json.loads(f.attrs["progress"])["rows"].values()) if "progress" in f.attrs else 0


def contents(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        out = {"skipped": f["skipped"][:].tolist(), "classes": f.attrs["classes"], "attrs": sorted(f.attrs)}
        for split in ("train", "val", "test"):
            out[split] = {name: f[split][name][:] for name in f[split]}
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """42 tiny images and one bad file, extracted in one go (in this process)."""
    tmp = tmp_path_factory.mktemp("interrupts")
    images = make_image_folder(tmp / "images", {"train": 8, "val": 3, "test": 3})
    (images / "train" / "red" / "broken.png").write_text("not a png")
    out = tmp / "reference.h5"
    extract_folder(images, out, ExtractSettings(image_size=64, batch_size=2, dtype="float32", workers=0), quiet=True)
    return images, out


@pytest.mark.slow
def test_killed_and_interrupted_runs_resume_to_the_same_file(reference, tmp_path):
    images, ref = reference
    out, tmp = tmp_path / "features.h5", tmp_path / "features.h5.tmp"
    rows_before, point = [], 0
    for seed in (1, 2):
        point += int(np.random.default_rng(seed).integers(2, 14))   # images done when killed, 43 in all
        run = Run(images, out)
        run.wait_for_progress(point)
        os.kill(run.proc.pid, signal.SIGSTOP)   # paused mid-write, still holding the lock
        if seed == 1:
            line = one_line_error(run_cli("extract", images, "--out", out, *OPTIONS))
            assert f"being written by another run (pid {run.proc.pid}" in line
        os.kill(run.proc.pid, signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL and not out.exists()
        rows_before.append(checkpointed_rows(tmp))
    if None not in rows_before:
        assert rows_before[1] >= rows_before[0]   # the second run continued the first, did not start over

    point += int(np.random.default_rng(3).integers(2, 10))
    run = Run(images, out, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as in a terminal
    run.wait_for_progress(point)
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(timeout=30) == 130, run.stderr
    assert time.monotonic() - sent < 5
    kept = checkpointed_rows(tmp)
    assert run.stderr.strip().splitlines()[-1] == (f"interrupted: {kept} images are kept in {tmp}; "
                                                   f"run the same command again to continue from there")
    assert kept >= (rows_before[1] or 0) and not out.exists()

    final = run_cli("extract", images, "--out", out, *OPTIONS, check=True).stderr   # the stale lock does not block
    extracted, skipped, found, computed, reused = map(int, re.search(
        r"extracted (\d+) \+ skipped (\d+) = found (\d+) images \((\d+) computed, (\d+) reused\)", final).groups())
    assert (extracted, skipped, found) == (42, 1, 43)
    assert (computed, reused) == (42 - kept, kept)
    assert not tmp.exists()
    mine, theirs = contents(out), contents(ref)
    for split in ("train", "val", "test"):
        assert mine[split].keys() == theirs[split].keys()
        for name in mine[split]:
            assert np.array_equal(mine[split][name], theirs[split][name]), (split, name)   # bit for bit
    assert (mine["skipped"], mine["classes"], mine["attrs"]) == (theirs["skipped"], theirs["classes"], theirs["attrs"])


def limit_file_size(size: int):
    """For the child: a real OS limit on the size of any file it writes (EFBIG instead of SIGXFSZ),
    which fails writes as a full disk does (ENOSPC) without needing to mount a small file system."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return apply


def test_a_full_disk_is_a_clear_error_and_the_previous_cache_stays(reference, tmp_path):
    images, ref = reference
    out = tmp_path / "features.h5"
    out.write_bytes(ref.read_bytes())
    run = Run(images, out, preexec_fn=limit_file_size(ref.stat().st_size // 2))   # all rows reused, then written
    assert run.wait() == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"error: cannot write {out}.tmp: File too large; {out} is left as it was"
    assert "Traceback" not in run.stderr
    assert out.read_bytes() == ref.read_bytes() and not Path(f"{out}.tmp").exists()


def test_a_resumed_writer_drops_rows_written_after_the_last_checkpoint(tmp_path):
    attrs = {"fingerprint": "f", "plan": "p"}
    writer = FeatureWriter(tmp_path / "c.h5", attrs, {"pool": 4}, "float32")
    writer.append("train", {"pool": np.ones((3, 4))}, [0, 1, 0], ["a", "b", "c"], ["a" * 64] * 3)
    writer.checkpoint("train", 4)
    writer.append("val", {"pool": np.ones((2, 4))}, [0, 1], ["d", "e"], ["d" * 64] * 2)   # a split not yet checkpointed
    writer.skip([("f", "bad")])
    writer.file.create_group("test").create_dataset("features", (0, 4))   # killed between a group's datasets
    writer.close()   # as on Ctrl-C: the file is flushed with the rows after the checkpoint
    resumed = FeatureWriter(tmp_path / "c.h5", attrs, {"pool": 4}, "float32")
    assert (resumed.progress, resumed.kept, resumed.skipped) == ({"train": 4}, 3, [])
    assert resumed.file["train"]["paths"].shape[0] == 3 and sorted(resumed.file) == ["skipped", "train"]
    resumed.append("test", {"pool": np.ones((1, 4))}, [1], ["g"], ["g" * 64])   # the split is made again, whole
    assert resumed.rows("test") == 1
    resumed.abort()
    other = FeatureWriter(tmp_path / "c.h5", dict(attrs, plan="q"), {"pool": 4}, "float32")   # another plan
    assert (other.progress, other.kept, "train" in other.file) == ({}, 0, False)
    other.abort()


def test_an_interrupted_extract_stops_its_decoding_workers_at_once(reference, tmp_path):
    """The batches are closed when extraction stops, not when the stopped run's frames are collected
    (which a caller holding the exception, like this test, delays)."""
    import multiprocessing

    from pipeline.data.folders import scan
    from pipeline.features.backbones.loading import build_backbone
    from pipeline.features.extract import extract
    from pipeline.runtime.errors import Interrupted
    images, _ = reference
    backbone = build_backbone(image_size=64)

    def interrupt_second_batch(n):
        if n == 2:
            raise KeyboardInterrupt
    before = set(multiprocessing.active_children())
    with pytest.raises(Interrupted) as stopped, embedder_calls(interrupt_second_batch) as forwards:
        extract(scan(images), backbone, tmp_path / "f.h5", ExtractSettings(batch_size=2, workers=2, dtype="float32"),
                quiet=True)
    assert "run the same command again" in str(stopped.value) and len(forwards) == 1
    assert not set(multiprocessing.active_children()) - before
