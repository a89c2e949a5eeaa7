"""BatchNorm folding: the inference copy runs fewer layers, gives the same features and predictions,
leaves the backbone's own model alone, and is refused where folding would change the outputs."""
from pathlib import Path

import pytest
import skimage
import torch
from PIL import Image
from torch import nn

from pipeline.features.backbones.loading import build_backbone

from pipeline.features.engines.torch import Embedder, FeatureHook, inference_model
from pipeline.features.folding import ActivationAfterFold, folded

PHOTOS = Path(skimage.__file__).parent / "data"


def batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", "imagenet")


def test_real_weights_fold_to_the_same_features_and_predictions(lite0):
    before = {k: v.clone() for k, v in lite0.model.state_dict().items()}
    model = inference_model(lite0)
    assert batchnorms(lite0.model) == 49 and batchnorms(model) == 0
    assert isinstance(model.bn2, ActivationAfterFold)
    assert all(torch.equal(v, lite0.model.state_dict()[k]) for k, v in before.items())   # original untouched

    transform = lite0.preprocessing.transform()
    photos = torch.stack([transform(Image.open(PHOTOS / p).convert("RGB")) for p in ("chelsea.png", "coffee.png")])
    hooks = FeatureHook(lite0.model, lite0.layer), FeatureHook(model, lite0.layer)
    with torch.inference_mode():
        logits = lite0.model(photos), model(photos)
    torch.testing.assert_close(hooks[1].output, hooks[0].output, rtol=1e-4, atol=1e-4)
    assert logits[1].argmax(1).tolist() == logits[0].argmax(1).tolist() and logits[1][1].argmax() == 967
    with Embedder(lite0) as embed:
        assert batchnorms(embed.model) == 0


class ConvBatchNorm(nn.Module):
    """A convolution whose output is normalised and, with `reuse`, also added back unnormalised."""

    def __init__(self, reuse: bool):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool, self.reuse = nn.AdaptiveAvgPool2d(1), reuse

    def forward(self, x):
        y = self.conv(x)
        return self.pool(self.bn(y) + y if self.reuse else self.bn(y))


def trained_statistics(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model.eval()


def test_a_convolution_output_used_twice_is_not_folded():
    x = torch.randn(2, 3, 8, 8)
    alone = trained_statistics(ConvBatchNorm(reuse=False))
    assert isinstance(folded(alone, ("pool",), x).bn, nn.Identity)
    reused = trained_statistics(ConvBatchNorm(reuse=True))
    assert folded(reused, ("pool",), x) is reused       # the same pair, refused by the check on `x`


def test_a_feature_layer_that_is_a_convolution_keeps_its_own_output():
    model = trained_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                             nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1)))
    x = torch.randn(2, 3, 12, 12)
    copy = folded(model, ("3", "5"), x)
    assert copy is not model
    assert isinstance(copy[1], nn.Identity) and isinstance(copy[4], nn.BatchNorm2d)   # conv "3" is a feature layer
    assert torch.equal(copy[3].weight, model[3].weight)
    with torch.inference_mode():
        torch.testing.assert_close(copy(x), model(x))


def test_a_network_without_batchnorm_is_used_as_it_is():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)).eval()
    assert folded(model, ("2",), torch.randn(1, 3, 8, 8)) is model
