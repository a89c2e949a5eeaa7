"""Errors the command line turns into one clear line and exit code 2; warnings as single lines."""
import os
import sys
from pathlib import Path
from typing import NoReturn

EXIT_CODE_DIR = "PIPELINE_EXIT_CODE_DIR"   # set by `--nproc`: each torchrun rank leaves its exit code there


class UserError(Exception):
    """Bad input or settings: the message alone tells the user what to fix."""


class Interrupted(Exception):
    """The user stopped a run that can be resumed; the message says how (exit code 130)."""


def warn(message: str) -> None:
    """A problem worth knowing that does not stop the run: one stderr line prefixed 'warning:'."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def exit_with(code: int) -> NoReturn:
    """Exit with `code`; a rank launched by `--nproc` also records it, since torchrun itself exits 1."""
    folder = os.environ.get(EXIT_CODE_DIR)
    if folder:
        Path(folder, f"rank{os.environ.get('RANK', 0)}").write_text(str(code))
    sys.exit(code)
