"""The `pixels` backbone family, added as one module of pipeline.features.backbones: each image's own pixels,
resized and flattened, as its feature vector, through the same extraction as any network."""
import numpy as np
import torch
from PIL import Image

from pipeline.features.extract import extract_folder
from pipeline.features.settings import ExtractSettings
from pipeline.storage.cache import open_cache


def test_pixels_vectors_are_the_images_resized_and_flattened(image_folder, tmp_path):
    out = tmp_path / "pixels.h5"
    s = ExtractSettings(backbone="pixels", image_size=8, dtype="float32", engine="torch", workers=0)
    summary = extract_folder(image_folder, out, s, quiet=True)
    assert summary.computed > 0
    with open_cache(out) as cache:
        assert (cache.attrs["backbone"], cache.attrs["weights"], cache.attrs["weights_sha256"]) == \
            ("pixels", "none", "none")
        train = cache.read("train")
    assert train.features.shape[1] == 3 * 8 * 8
    image = Image.open(image_folder / train.paths[0]).convert("RGB").resize((8, 8), Image.BILINEAR)
    want = (torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1) - 0.5) / 0.5
    np.testing.assert_allclose(train.features[0], want.flatten().numpy(), atol=0.02)
