"""File helpers shared by caches, model directories, weights and image readers: digests, and creating or
opening files without following planted symbolic links or blocking on FIFOs and devices."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pipeline.runtime.errors import InputError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "a file of an unknown kind"


def open_regular(path: Path, flags: int = os.O_RDONLY, follow: bool = True, mode: int = 0o666) -> int:
    """A descriptor of `path` opened without blocking (a FIFO would wait for a writer) and checked to
    be a regular file after opening, so a file swapped in between cannot slip through; `follow=False`
    also refuses a symbolic link. Raises OSError (a FIFO, device or folder: errno EINVAL, with its
    kind in the message)."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW), mode)
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{kind_of(kind)}, not a regular file", str(path))
    os.set_blocking(fd, True)
    return fd


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (FIFOs, devices and larger files are
    refused with OSError, without reading them)."""
    fd = open_regular(path)
    with open(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise OSError(errno.EFBIG, f"{size} bytes, more than the limit of {limit}", str(path))
        data = f.read(limit + 1)
    if len(data) > limit:   # grew while being read
        raise OSError(errno.EFBIG, f"more than the limit of {limit} bytes", str(path))
    return data


def check_replaceable(path: Path, what: str) -> None:
    """Refuse an output path that exists and is not a regular file (a device, FIFO or folder, also
    behind a symbolic link): writing it would replace or feed it."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):   # nothing there (creating it fails with its own reason)
        return
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be checked: {exc.strerror}")
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {path} is {kind_of(mode)}; name a regular file")


def fresh_file(path: Path) -> None:
    """Make room for creating `path` exclusively: remove what is there unless it is a folder. A
    symbolic link is removed, never followed, so its target is untouched."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise InputError(f"{path} is a folder; remove it")
    os.unlink(path)


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a fresh temporary file beside `path` and rename it over `path`: readers see the
    old file or the whole new one, and a symbolic link at `path` is replaced, not followed. Paths in
    `text` that are not valid UTF-8 keep their bytes (surrogate escapes)."""
    path = Path(path)
    check_replaceable(path, "output")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def output_lock(target: Path):
    """Hold `<target>.lock` for the whole write and remove it afterwards; a second writer is refused at
    once with the holder's pid.

    A POSIX record lock (lockf), not flock: it belongs to this process alone, so forked DataLoader
    workers do not hold it, and the kernel drops it the moment this process dies (also by SIGKILL; the
    file then stays, unlocked, and the next run takes it over). The lock file is opened without following
    a symbolic link and must be a regular file. A lock taken on a file that was removed in the meantime
    is retried on the new one, so removing it on release cannot let two runs in."""
    path = Path(target).with_name(Path(target).name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = open_regular(path, os.O_RDWR | os.O_CREAT, follow=False)
        except OSError as exc:
            reason = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise InputError(f"lock file {path} is {reason}; refusing to use it (remove it)")
        f = open(fd, "r+")
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read(32).strip() or "?"
            f.close()
            raise InputError(f"{target} is being written by another run (pid {holder}, lock {path}); "
                            f"wait for it to finish")
        if still_named(path, fd):
            break
        f.close()
    with f:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            if still_named(path, fd):
                path.unlink()
            fcntl.lockf(f, fcntl.LOCK_UN)


def still_named(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (the same inode)."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)
