"""Outputs an attacker or a slip can aim at: files that are not caches, symbolic links planted beside
`--out`, device nodes and FIFOs, a killed run's lock, a full disk. Real `pipeline extract` subprocesses."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from pipeline.runtime import files
from pipeline.runtime.files import output_lock
from tests.conftest import ROOT, cli_in_process, make_image_folder
from tests.test_bad_input import one_line_error
from tests.test_interrupts import limit_file_size

OPTIONS = ("--image-size", 64, "--workers", 0)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("hostile_out") / "images", {"train": 3, "val": 1, "test": 1})


def written_beside(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_file_that_is_not_a_cache_is_not_replaced_without_force(images, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n1,a\n")
    line = one_line_error(cli_in_process("extract", images, "--out", labels, *OPTIONS))
    assert line == (f"error: --out {labels} exists and is not a feature cache; refusing to replace it "
                    f"(name another file, or pass --force)")
    assert labels.read_text() == "id,label\n1,a\n"
    assert written_beside(tmp_path) == {"labels.csv"}   # refused before anything was written: no lock, no manifest


def device_node(path: Path) -> Path:
    """A character device like /dev/null (we run as root in the test container), else a FIFO."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        os.mkfifo(path)
    return path


@pytest.mark.parametrize("make, words", [
    (device_node, "is a character device; name a regular file"),
    (os.mkfifo, "is a FIFO; name a regular file"),
])
def test_a_device_or_fifo_as_out_is_refused_even_with_force(images, tmp_path, make, words):
    out = tmp_path / "node"
    make(out)
    kind = stat.S_IFMT(os.lstat(out).st_mode)
    line = one_line_error(cli_in_process("extract", images, "--out", out, "--force", *OPTIONS))
    if stat.S_ISFIFO(kind):
        words = "is a FIFO; name a regular file"
    assert line == f"error: --out {out} {words}"
    assert stat.S_IFMT(os.lstat(out).st_mode) == kind and written_beside(tmp_path) == {"node"}


def test_a_manifest_path_that_cannot_be_replaced_is_refused_before_extracting(images, tmp_path):
    (tmp_path / "f.manifest.csv").mkdir()
    line = one_line_error(cli_in_process("extract", images, "--out", tmp_path / "f.h5", *OPTIONS))
    assert line == f"error: manifest {tmp_path / 'f.manifest.csv'} is a folder; name a regular file"
    assert written_beside(tmp_path) == {"f.manifest.csv"}


def test_links_planted_beside_out_are_replaced_not_followed(images, tmp_path):
    """`<out>.tmp` and the manifest are created anew (a link there is removed, its target untouched);
    `--force` replaces a photo that is not a cache."""
    out = tmp_path / "photo.jpg"
    out.write_bytes(b"\xff\xd8\xff a photo")
    victims = {name: tmp_path / f"victim{i}" for i, name in enumerate(("photo.jpg.tmp", "photo.manifest.csv"))}
    for name, victim in victims.items():
        victim.write_text("precious")
        (tmp_path / name).symlink_to(victim)
    cli_in_process("extract", images, "--out", out, "--force", *OPTIONS, check=True)
    assert all(victim.read_text() == "precious" for victim in victims.values())
    assert h5py.is_hdf5(out) and not (tmp_path / "photo.jpg.tmp").exists()
    manifest = tmp_path / "photo.manifest.csv"
    assert not manifest.is_symlink() and manifest.read_text().startswith("path,label,split\n")
    assert len(manifest.read_text().splitlines()) == 1 + 15


def test_a_link_planted_as_the_lock_is_refused(images, tmp_path):
    out, victim = tmp_path / "f.h5", tmp_path / "victim"
    victim.write_text("precious")
    Path(f"{out}.lock").symlink_to(victim)
    line = one_line_error(cli_in_process("extract", images, "--out", out, *OPTIONS))
    assert line == f"error: lock file {out}.lock is a symbolic link; refusing to use it (remove it)"
    assert victim.read_text() == "precious" and written_beside(tmp_path) == {"f.h5.lock", "victim"}


HOLDER = """
import os, sys, time
from pipeline.runtime import files
from pipeline.runtime.files import output_lock
with output_lock(sys.argv[1]):
    child = os.fork()                       # as a DataLoader worker is forked, inheriting the lock's file
    if child == 0:
        os.closerange(1, 3)                 # the test reads the parent's output to its end
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    os.kill(os.getpid(), 9)
"""


def test_the_lock_of_a_killed_run_is_free_at_once_although_its_children_live(tmp_path):
    out = tmp_path / "f.h5"
    proc = subprocess.run([sys.executable, "-c", HOLDER, str(out)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    child = int(proc.stdout)
    try:
        assert proc.returncode == -9 and os.path.exists(f"/proc/{child}")   # the forked child still runs
        with output_lock(out):   # not refused naming the dead pid
            assert Path(f"{out}.lock").read_text() == f"{os.getpid()}\n"
        assert not Path(f"{out}.lock").exists()    # removed on release
    finally:
        os.kill(child, 9)


def test_a_lock_file_removed_and_recreated_while_taken_is_taken_again(tmp_path, monkeypatch):
    """A run that locked a lock file its predecessor removed on release retries on the new file, so two
    runs never hold locks on two different files of one name."""
    out, lock = tmp_path / "f.h5", tmp_path / "f.h5.lock"
    real, opened = files.open_regular, []

    def open_then_replace(path, flags, follow):
        fd = real(path, flags, follow=follow)
        if not opened:                              # the predecessor removes the file just after it was opened
            Path(path).unlink()
            Path(path).write_text("")
        opened.append(os.fstat(fd).st_ino)
        return fd

    monkeypatch.setattr(files, "open_regular", open_then_replace)
    with output_lock(out):
        assert len(opened) == 2 and os.stat(lock).st_ino == opened[1]
    assert not lock.exists()


def test_a_full_disk_before_the_first_row_is_one_line_and_leaves_nothing(images, tmp_path):
    out = tmp_path / "f.h5"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "extract", str(images), "--out", str(out),
                           *map(str, OPTIONS)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), preexec_fn=limit_file_size(1024))
    assert one_line_error(proc) == f"error: cannot write {out}.tmp: File too large; {out} is left as it was"
    assert written_beside(tmp_path) == set()


def alive(pid: int) -> bool:
    """Running, not merely a zombie that nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_decoding_workers_end_with_a_killed_extract(tmp_path):
    """PyTorch's own watchdog lets orphaned workers run on for up to 5 s; they go at once."""
    images = make_image_folder(tmp_path / "images", {"train": 30, "val": 2}, classes=("red", "green"))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "extract", str(images), "--out", str(tmp_path / "f.h5"),
                             "--image-size", "64", "--workers", "2", "--batch-size", "2"],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    end = time.monotonic() + 300
    while len(workers := children.read_text().split()) < 2:
        assert proc.poll() is None and time.monotonic() < end, "no decoding workers started"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    killed = time.monotonic()
    while any(alive(int(w)) for w in workers) and time.monotonic() - killed < 5:
        time.sleep(0.01)
    assert time.monotonic() - killed < 1.5, "workers outlived their parent"
