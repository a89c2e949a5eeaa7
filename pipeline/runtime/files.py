"""File helpers shared by caches, model directories, weights and image readers: digests, and creating or
opening files without following planted symbolic links or blocking on FIFOs and devices."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


def read_regular(path: Path, limit: int, follow: bool = True) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (FIFOs, devices and larger files are
    refused with OSError, without reading them; `follow=False`: links too)."""
    fd = open_regular(path, follow=follow)
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


class OutputError(InputError):
    """A write the system refused (no space, no permission, a read-only file system); `reason` says which."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through `replaced_atomically`: readers see the old file or the whole new one,
    and a symbolic link at `path` is replaced, not followed. Paths in text that are not valid UTF-8 keep
    their bytes (surrogate escapes)."""
    with replaced_atomically(path) as tmp:
        fd = open_regular(tmp, os.O_WRONLY | os.O_TRUNC, follow=False)
        if isinstance(data, str):
            f = open(fd, "w", encoding="utf-8", errors="surrogateescape", newline="")
        else:
            f = open(fd, "wb")
        with f:
            f.write(data)


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A fresh temporary file beside `path` (created with O_EXCL, so nothing planted at its name is
    followed) for the block to write, by name if a library insists; when the block ends it is synced and
    renamed over `path`. On any error it is removed and `path` is left as it was; a write the system
    refuses (a full disk, no permission, a read-only file system) is an InputError naming `path`."""
    path = Path(path)
    check_replaceable(path, "output")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
        tmp = Path(name)
        os.close(fd)
        yield tmp
        _sync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; {path} is left as it was",
                          exc.strerror or str(exc)) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    fd = open_regular(path, follow=False)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


MANIFEST = ".written"   # in a report folder: the files the command wrote there, one per line


@contextmanager
def staged_folder(out_dir: Path, what: str, owned: bool = True) -> Iterator[Path]:
    """A fresh temporary folder beside `out_dir` for the block to write a whole folder into (a report, a
    model directory). When the block ends it replaces `out_dir` by renaming, so `out_dir` is the old
    folder or the whole new one; on any error it is removed and `out_dir` is left as it was. A write the
    system refuses is an InputError naming `out_dir`.

    `owned`: the new folder gets a manifest of its files, and an existing `out_dir` is replaced only when
    its own manifest lists everything in it (`check_owned`): a command never deletes what it did not
    write. Without it, the caller has decided that `out_dir` may go (a model directory and --force)."""
    out_dir = Path(out_dir)
    if owned:
        check_owned(out_dir, what)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{secrets.token_hex(4)}")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        if owned:
            write_atomically(tmp / MANIFEST, "".join(f"{name}\n" for name in sorted(_files_under(tmp))))
            check_owned(out_dir, what)
        _replace(tmp, out_dir)
    except (OSError, OutputError) as exc:
        reason = exc.reason if isinstance(exc, OutputError) else exc.strerror or str(exc)
        raise OutputError(f"cannot write {what} {out_dir}: {reason}; {out_dir} is left as it was",
                          reason) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(new: Path, out_dir: Path) -> None:
    """Rename `new` to `out_dir`; an existing `out_dir` is moved aside first and deleted afterwards."""
    try:
        os.rename(new, out_dir)   # replaces a missing or empty folder at once
        return
    except OSError as exc:
        if not out_dir.is_dir() or out_dir.is_symlink() or not any(out_dir.iterdir()):
            raise exc
    old = out_dir.with_name(f".{out_dir.name}.old-{secrets.token_hex(4)}")
    os.rename(out_dir, old)
    os.rename(new, out_dir)
    shutil.rmtree(old, ignore_errors=True)   # never follows a link inside


def check_owned(out_dir: Path, what: str) -> None:
    """Refuse an `out_dir` that a `staged_folder` could not replace without deleting something its
    manifest does not list (a user's file, a planted link), or that is not a folder."""
    out_dir = Path(out_dir)
    try:
        mode = os.lstat(out_dir).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        raise InputError(f"--out {out_dir} is {kind_of(mode) if not stat.S_ISREG(mode) else 'a file'}; "
                        f"name a folder for the {what}")
    try:
        listed = set(read_regular(out_dir / MANIFEST, 1 << 20, follow=False)
                     .decode("utf-8", "surrogateescape").splitlines())
    except FileNotFoundError:
        listed = set()
    except OSError as exc:
        raise InputError(f"{out_dir / MANIFEST} cannot be read: {exc.strerror}; move {out_dir} away")
    foreign = sorted(name for name in _files_under(out_dir, links=True) if name != MANIFEST and
                     (name not in listed or not stat.S_ISREG(os.lstat(out_dir / name).st_mode)))
    if foreign:
        raise InputError(f"--out {out_dir} holds files this {what} did not write ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); move them away or choose another --out")


def _files_under(folder: Path, links: bool = False) -> Iterator[str]:
    """The relative names of the files under `folder`, without following links (with `links`, a link to
    a folder is named as a file)."""
    for parent, dirs, names in os.walk(folder):
        if links:
            names = names + [d for d in dirs if os.path.islink(os.path.join(parent, d))]
        for name in names:
            yield os.path.relpath(os.path.join(parent, name), folder)


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
