"""What a command spends importing its modules and exiting, with Python's garbage collector as it comes and as
the commands run it (pipeline.runtime.imports: off while they import, what the imports made frozen), side by
side in alternating rounds of fresh interpreters.

    python benchmarks/startup.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The modules each kind of command imports before its work (as cli.py does for extract, train and predict).
COMMANDS = {
    "extract": "import pipeline.features.backbones.loading; import pipeline.features.extract",
    "train": "import pipeline.heads.train",
    "predict": "import pipeline.models.predict",
}
POLICIES = {
    "collector as it comes": "{imports}",
    "off while importing, then frozen": "from pipeline.runtime.imports import collect_after_imports, heavy_imports\n"
                                        "collect_after_imports()\nwith heavy_imports():\n    {imports}",
}


def measure(imports: str, policy: str) -> tuple[float, float]:
    """Seconds from the interpreter's start to the imports done, and from there to the process's end."""
    code = policy.format(imports=imports) + "\nimport sys, time\nsys.stderr.write(repr(time.time()))\n"
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    end = time.time()
    imported = float(proc.stderr.splitlines()[-1])
    return imported - start, end - imported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times = {(c, p): [] for c in COMMANDS for p in POLICIES}
    for _ in range(args.rounds):
        for command, imports in COMMANDS.items():
            for name, policy in POLICIES.items():
                times[command, name].append(measure(imports, policy))
    print("| command | garbage collector | import s | exit s | total s | total / as it comes |")
    print("|---|---|---:|---:|---:|---:|")
    for command in COMMANDS:
        base = None
        for name in POLICIES:
            imported = statistics.median(t[0] for t in times[command, name])
            exited = statistics.median(t[1] for t in times[command, name])
            base = base or imported + exited
            print(f"| {command} | {name} | {imported:.2f} | {exited:.2f} | {imported + exited:.2f} | "
                  f"{(imported + exited) / base:.2f} |")


if __name__ == "__main__":
    main()
