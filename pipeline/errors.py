"""Errors the command line turns into one clear line and exit code 2; warnings as single lines."""
import sys


class UserError(Exception):
    """Bad input or settings: the message alone tells the user what to fix."""


class Interrupted(Exception):
    """The user stopped a run that can be resumed; the message says how (exit code 130)."""


def warn(message: str) -> None:
    """A problem worth knowing that does not stop the run: one stderr line prefixed 'warning:'."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
