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
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.extract import extract_folder
from tests.conftest import ROOT, make_image_folder, run_cli
from tests.test_bad_input import one_line_error

OPTIONS = ("--image-size", 64, "--workers", 0, "--dtype", "float32", "--batch-size", 2)


def start(images: Path, out: Path, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "pipeline", "extract", str(images), "--out", str(out), "--quiet",
                             *map(str, OPTIONS)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def wait_for_writing(tmp: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until `proc` has created or reopened (and so touched) the temporary file."""
    started, end = time.time(), time.monotonic() + timeout
    while not (tmp.exists() and tmp.stat().st_mtime >= started):
        assert proc.poll() is None, f"run ended before writing {tmp}: {proc.communicate()[1]}"
        assert time.monotonic() < end, f"{tmp} was never written"
        time.sleep(0.005)


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
    summary = extract_folder(images, out, image_size=64, batch_size=2, dtype="float32", workers=0, quiet=True)
    return images, out, summary.seconds


def test_killed_and_interrupted_runs_resume_to_the_same_file(reference, tmp_path):
    images, ref, seconds = reference
    out, tmp = tmp_path / "features.h5", tmp_path / "features.h5.tmp"
    rows_before = []
    for seed in (1, 2):
        proc = start(images, out)
        wait_for_writing(tmp, proc)
        time.sleep(np.random.default_rng(seed).uniform(0, 0.8 * seconds))
        os.kill(proc.pid, signal.SIGSTOP)   # paused mid-write, still holding the lock
        if seed == 1:
            refused = run_cli("extract", images, "--out", out, *OPTIONS)
            line = one_line_error(refused)
            assert f"being written by another run (pid {proc.pid}" in line
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL and not out.exists()
        rows_before.append(checkpointed_rows(tmp))
    if None not in rows_before:
        assert rows_before[1] >= rows_before[0]   # the second run continued the first, did not start over

    proc = start(images, out, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as in a terminal
    wait_for_writing(tmp, proc)
    time.sleep(np.random.default_rng(3).uniform(0, 0.5 * seconds))
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 130, (stderr, proc.stdout)
    kept = checkpointed_rows(tmp)
    assert stderr.strip().splitlines()[-1] == (f"interrupted: {kept} images are kept in {tmp}; "
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
    images, ref, _ = reference
    out = tmp_path / "features.h5"
    out.write_bytes(ref.read_bytes())
    proc = start(images, out, preexec_fn=limit_file_size(ref.stat().st_size // 2))   # all rows reused, then written
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert stderr.strip() == f"error: cannot write {out}.tmp: File too large; {out} is left as it was"
    assert out.read_bytes() == ref.read_bytes() and not Path(f"{out}.tmp").exists()
