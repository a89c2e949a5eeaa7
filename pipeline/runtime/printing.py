"""What commands print: every name shown escaped, and library warnings summarised, one line each.

Names come from the user's disk (file names, CSV cells, class names, HDF5 attributes): shown raw, an
escape sequence in one could clear or rewrite the terminal, a newline could forge a line, and bytes that
are not UTF-8 (kept as surrogate escapes) would stop the command with UnicodeEncodeError."""
from __future__ import annotations

import contextlib
import re
import sys
import warnings
from collections import Counter

# C0 and C1 control characters, DEL, lone surrogates (undecodable bytes), and the bidirectional overrides
# that reorder what follows them on screen.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:          # a byte that was not UTF-8, as os.fsdecode keeps it
        return f"\\x{code - 0xDC00:02x}"
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def shown(value, limit: int | None = None) -> str:
    """`value` as text that is safe on a terminal and always one line: control characters escaped
    (\\n, \\x1b), bytes that are not UTF-8 as \\xNN; with `limit`, at most that many characters."""
    text = _UNSAFE.sub(_escape, str(value))
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def say(line: str, err: bool = True) -> None:
    """Print one line, escaped (`shown`), to stderr (`err`) or stdout."""
    print(shown(line), file=sys.stderr if err else sys.stdout, flush=True)


@contextlib.contextmanager
def warnings_summarised():
    """Collect the warnings libraries raise in the block (scikit-learn's convergence warnings, torch's
    exporter notes) and print each kind once afterwards, with how often it came, as one 'warning:' line."""
    with warnings.catch_warnings(record=True) as caught:   # the filters in force still apply
        yield
    for line in summary(caught):   # not after an error: its one line says what matters
        say(f"warning: {line}")


def summary(caught: list) -> list[str]:
    """One line per kind of warning in `caught`: its category, how many came, and the first message."""
    counts = Counter(w.category.__name__ for w in caught)
    first = {}
    for w in caught:
        first.setdefault(w.category.__name__, " ".join(str(w.message).split()))
    return [f"{name}{f' (x{counts[name]})' if counts[name] > 1 else ''}: {shown(message, 200)}"
            for name, message in first.items()]
