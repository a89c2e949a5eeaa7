"""DVC stage `extract@NAME`: python stages/extract.py NAME DATA OUT (settings: params.yaml `extract`, with
`extractors.NAME` on top)"""
import sys
from pathlib import Path

from pipeline.cli import run_stage
from pipeline.config import extractor_params
from pipeline.features.extract import extract_folder


def main():
    name, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    p = extractor_params(Path("params.yaml"), name)
    summary = extract_folder(data, out, p.backbone, p.weights, p.layer, p.image_size, p.val_fraction,
                             p.test_fraction, p.seed, labels=p.labels, id_column=p.id_column,
                             label_column=p.label_column, tta=p.tta, compute_stats=p.compute_stats,
                             reuse=p.reuse, batch_size=p.batch_size, device=p.device, dtype=p.dtype,
                             workers=p.workers)
    print("\n".join(summary.lines()))


run_stage(main)
