"""DVC stage `compare`: python stages/compare.py OUT_FOLDER MODEL_DIR..."""
import sys
from pathlib import Path

from pipeline.cli import run_stage
from pipeline.report import compare, markdown


def main():
    print(markdown(compare([Path(d) for d in sys.argv[2:]], Path(sys.argv[1]))), end="")


run_stage(main)
