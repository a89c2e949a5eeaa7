"""Time recording skipped files in a cache's /skipped table: all rows in one FeatureWriter.skip call (as
extract does) against one call per row (as it did before), side by side in one run.

    python benchmarks/skipped_rows.py --rows 20000
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.storage.cache import FeatureWriter  # noqa: E402


def timed(rows: list[tuple[str, str]], one_call: bool, folder: Path) -> float:
    writer = FeatureWriter(folder / f"{'one' if one_call else 'each'}.h5", {"fingerprint": "f", "plan": "p"},
                           {"pool": 4}, "float32")
    start = time.perf_counter()
    if one_call:
        writer.skip(rows)
    else:
        for row in rows:
            writer.skip([row])
    seconds = time.perf_counter() - start
    assert len(writer.file["skipped"]) == len(rows)
    writer.abort()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    args = parser.parse_args()
    rows = [(f"train/class/{i:07d}.txt", "not an image file type (.txt)") for i in range(args.rows)]
    with tempfile.TemporaryDirectory() as folder:
        each, one = timed(rows, False, Path(folder)), timed(rows, True, Path(folder))
    print(f"{args.rows} skipped rows: one call per row {each:.2f} s, one call {one:.3f} s, {each / one:.0f}x")


if __name__ == "__main__":
    main()
