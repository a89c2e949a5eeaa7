"""Errors the API raises and the command line turns into one clear line and exit code 2; warnings as single lines."""
import json
import os
import reprlib
import sys
from pathlib import Path
from typing import NoReturn

from pipeline.runtime.imports import collect_after_imports
from pipeline.runtime.printing import say, warnings_summarised

EXIT_CODE_DIR = "PIPELINE_EXIT_CODE_DIR"   # set by `--nproc`: each torchrun rank leaves its exit code there


class InputError(ValueError):
    """Bad input or settings: the message alone tells the user what to fix (`pipeline.InputError`; the
    command line prints it as `error: MESSAGE` and exits with code 2)."""


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 60, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def quote(value, limit: int = 80) -> str:
    """`repr(value)` bounded in time and length, for error lines: a value read from a file (a YAML alias
    bomb expands to gigabytes) is shown by its start only."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Interrupted(Exception):
    """The user stopped a run that can be resumed; the message says how (exit code 130)."""


def check_minimums(minimums: dict, values: dict) -> None:
    """An InputError naming the first setting below its minimum; None (a default) passes."""
    for key, low in minimums.items():
        value = values.get(key)
        if value is not None and not isinstance(value, bool) and value < low:
            raise InputError(f"{key} must be at least {low}, got {value}")


def warn(message: str) -> None:
    """A problem worth knowing that does not stop the run: one stderr line prefixed 'warning:'. Under
    torchrun only rank 0 prints it: the warnings are about the data, which every rank reads alike."""
    if int(os.environ.get("RANK", 0)) == 0:
        say(f"warning: {message}")


def exit_with(code: int, message: str = "") -> NoReturn:
    """Print `message` and exit with `code`. A rank launched by `--nproc` records both for the launcher
    instead (torchrun itself exits 1, and every rank would print the same line)."""
    folder = os.environ.get(EXIT_CODE_DIR)
    if folder:
        report = Path(folder, f"rank{int(os.environ.get('RANK', 0)):05d}")
        report.write_text(json.dumps({"code": code, "message": message}))   # a fresh file the launcher made room for
    elif message:
        say(message)
    sys.exit(code)


def run_stage(fn) -> None:
    """Run `fn` with the command line's error contract: an InputError, or a file the system refuses (no
    permission, a file where a folder is needed), is one line and exit code 2; an interrupted run says
    what stopped (and how to resume, where it can) and exits with 130. Every line is escaped, and library
    warnings are summarised (`printing`)."""
    collect_after_imports()
    try:
        with warnings_summarised():
            fn()
    except InputError as exc:
        exit_with(2, f"error: {exc}")
    except OSError as exc:
        if exc.filename is None:
            raise
        exit_with(2, f"error: {exc.filename}: {exc.strerror or exc}")
    except Interrupted as exc:
        exit_with(130, str(exc))
    except KeyboardInterrupt:
        exit_with(130, "interrupted")
