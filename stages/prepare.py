"""DVC stage `prepare`: python stages/prepare.py ARCHIVE OUT_FOLDER"""
import sys
from pathlib import Path

from pipeline.data.demo import write_image_folder

archive, out = map(Path, sys.argv[1:3])
print(f"prepare: wrote {write_image_folder(archive, out)} images to {out}")
