"""Grad-CAM of a classifier trained on cached features: the heat map points at the evidence.

Each image is grey noise with one coloured square, and the class is the square's colour, so the right
place to look is known. EfficientNet-Lite0 with its real weights, logistic regression on the cache."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.images import read_image
from pipeline.features.extract import extract_folder
from pipeline.features.settings import ExtractSettings
from pipeline.heads.settings import train_settings
from pipeline.heads.train import train
from pipeline.models.directory import open_model
from pipeline.models.visualize import gradcam_maps
from tests.conftest import COLOURS, cli_in_process

SIZE, SQUARE = 256, 64


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> tuple[Path, dict[Path, tuple[int, int]]]:
    root = tmp_path_factory.mktemp("squares") / "images"
    rng = np.random.default_rng(0)
    corners = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(128 + rng.normal(0, 30, (SIZE, SIZE, 3)), 0, 255)
                x, y = rng.integers(0, SIZE - SQUARE, 2)
                pixels[y:y + SQUARE, x:x + SQUARE] = colour
                path = root / split / name / f"{i}.png"
                Image.fromarray(pixels.astype(np.uint8)).save(path)
                corners[path] = (int(x), int(y))
    return root, corners


@pytest.fixture(scope="module")
def logreg(squares, tmp_path_factory) -> Path:
    root, _ = squares
    folder = tmp_path_factory.mktemp("logreg")
    extract_folder(root, folder / "f.h5", ExtractSettings(image_size=224, workers=0), quiet=True)
    train(folder / "f.h5", folder / "model", train_settings("logreg", {}))
    return folder / "model"


def test_the_heat_map_of_a_classifier_on_cached_features_covers_the_square(squares, logreg):
    _, corners = squares
    model = open_model(logreg)
    net, pool = model.network()
    transform = model.preprocessing.transform()
    seen_as_model = model.preprocessing.resize_crop
    tests = sorted(p for p in corners if p.parts[-3] == "test")
    maps, predicted = gradcam_maps(net, pool, torch.stack([transform(read_image(p)[0]) for p in tests]))
    assert [model.classes[k] for k in predicted] == [p.parent.name for p in tests]
    inside_over_outside = []
    for path, heat in zip(tests, maps):
        x, y = corners[path]
        mask = Image.new("L", (SIZE, SIZE))
        mask.paste(255, (x, y, x + SQUARE, y + SQUARE))
        square = np.array(seen_as_model(mask)) > 127
        inside_over_outside.append(heat[square].mean() / heat[~square].mean())
    assert maps.shape == (len(tests), 224, 224) and maps.min() >= 0 and maps.max() <= 1
    assert np.median(inside_over_outside) > 3
    assert sum(r > 1 for r in inside_over_outside) >= 0.75 * len(tests)


@pytest.mark.slow
def test_gradcam_from_the_command_line_and_heads_without_a_tensor_form(squares, logreg, tmp_path):
    root, _ = squares
    proc = cli_in_process("visualize", logreg, root / "test", "--out", tmp_path / "visual", "--gradcam", "--device", "cpu",
                   check=True)
    assert "Grad-CAM of the same 12 images" in proc.stderr
    assert Image.open(tmp_path / "visual" / "gradcam.png").size[0] > 500
    knn = tmp_path / "knn"
    train(logreg.parent / "f.h5", knn, train_settings("knn", {"n_neighbors": 3}))
    proc = cli_in_process("visualize", knn, root / "test", "--out", tmp_path / "knn_visual", "--gradcam")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: a knn head is not made of tensor operations") and "Grad-CAM" in proc.stderr
    assert not (tmp_path / "knn_visual").exists()   # refused before anything was written
