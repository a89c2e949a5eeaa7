"""DVC stage `compare`: python stages/compare.py OUT_FOLDER MODEL_DIR..."""
import sys
from pathlib import Path

from pipeline.report.compare import compare, markdown

from pipeline.cli import run_stage


def main():
    print(markdown(compare([Path(d) for d in sys.argv[2:]], Path(sys.argv[1]))), end="")


run_stage(main)
