"""The bundled EfficientNet-Lite0/1/2 backbones carry real ImageNet weights, not a random network."""
from pathlib import Path

import pytest
import skimage
import torch
from PIL import Image

from pipeline.features.backbones.loading import build_backbone

PHOTOS = Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="module", params=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def lite(request):
    return build_backbone(request.param, "imagenet")


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", "imagenet")


def top1(backbone, photo: str) -> int:
    x = backbone.preprocessing.transform()(Image.open(PHOTOS / photo).convert("RGB"))[None]
    with torch.inference_mode():
        return int(backbone.model(x).argmax())


def test_cat_photo_is_ranked_a_cat(lite):
    assert top1(lite, "chelsea.png") in range(281, 286)   # ImageNet's domestic cat classes


def test_espresso_photo_is_ranked_espresso(lite):
    assert top1(lite, "coffee.png") == 967


def test_random_weights_do_not_know_the_cat():
    assert top1(build_backbone("efficientnet_lite0", "none"), "chelsea.png") not in range(281, 286)


def test_hooked_features_are_the_global_pool(lite0):
    x = torch.rand(2, 3, 64, 64)
    from pipeline.features.engines.torch import FeatureHook
    hook = FeatureHook(lite0.model, lite0.layer)
    with torch.inference_mode():
        lite0.model(x)
        pooled = lite0.model.forward_head(lite0.model.forward_features(x), pre_logits=True)
    hook.remove()
    assert hook.output.shape == (2, lite0.feature_dim)
    torch.testing.assert_close(hook.output, pooled)
