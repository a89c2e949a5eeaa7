"""Token features of vision transformers, each checked against a hand computation on the model's own token
outputs (timm's forward_features and forward_intermediates), on timm's tiny test ViTs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.features.backbones.loading import build_backbone

from pipeline.features.engines.torch import Embedder
from pipeline.runtime.errors import InputError


def features(backbone, x: torch.Tensor) -> dict[str, np.ndarray]:
    with Embedder(backbone) as embed:
        return embed(x)


def images(size: int) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_vit_token_features_match_a_hand_computation():
    layers = ["head_drop", "cls_token", "patch_mean", "cls_patch_mean", "cls_last4"]
    backbone = build_backbone("timm/test_vit", "none", layers)
    model = backbone.model
    assert backbone.layer == "head_drop"          # the default stays what the classifier takes
    assert backbone.feature_dims == {"head_drop": 64, "cls_token": 64, "patch_mean": 64, "cls_patch_mean": 128,
                                     "cls_last4": 256}
    x = images(160)
    got = features(backbone, x)
    with torch.inference_mode():
        tokens = model.forward_features(x)                              # [N, 1 + 100 patches, 64], normed
        blocks = model.forward_intermediates(x, indices=4, return_prefix_tokens=True, norm=True,
                                             intermediates_only=True)   # the last 4: (patches, prefix tokens)
        pre_logits = model.forward_head(tokens, pre_logits=True)
    assert tokens.shape[1] == 1 + 100 and len(blocks) == 4
    cls, patches = tokens[:, 0], tokens[:, 1:].mean(1)
    expected = {"head_drop": pre_logits, "cls_token": cls, "patch_mean": patches,
                "cls_patch_mean": torch.cat([cls, patches], 1),
                "cls_last4": torch.cat([prefix[:, 0] for _, prefix in blocks], 1)}
    for layer, value in expected.items():
        np.testing.assert_allclose(got[layer], value.numpy(), rtol=1e-5, atol=1e-5, err_msg=layer)
    np.testing.assert_allclose(got["cls_last4"][:, -64:], got["cls_token"], rtol=1e-5, atol=1e-5)  # last block


def test_patch_mean_leaves_register_tokens_out_and_class_features_need_a_class_token():
    """test_vit2 has a register token and no class token (it pools by averaging, like EVA-02 and BEiT)."""
    backbone = build_backbone("timm/test_vit2", "none", ["patch_mean"])
    model = backbone.model
    assert model.num_prefix_tokens == 1 and model.cls_token is None
    x = images(160)
    with torch.inference_mode():
        tokens = model.forward_features(x)
    np.testing.assert_allclose(features(backbone, x)["patch_mean"], tokens[:, 1:].mean(1).numpy(),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match=r"backbone timm/test_vit2.r160_in1k has no token feature 'cls_token'; "
                                        r"it offers: patch_mean$"):
        build_backbone("timm/test_vit2", "none", ["cls_token"])


def test_token_features_at_another_image_size_and_their_limits():
    backbone = build_backbone("timm/test_vit", "none", ["cls_patch_mean"], image_size=96)   # 6x6 patches
    x = images(96)
    with torch.inference_mode():
        tokens = backbone.model.forward_features(x)
    assert tokens.shape[1] == 1 + 36
    np.testing.assert_allclose(features(backbone, x)["cls_patch_mean"],
                               torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match=r"has 6 blocks, fewer than the 7 of 'cls_last7'"):
        build_backbone("timm/test_vit", "none", ["cls_last7"])
    with pytest.raises(InputError, match=r"backbone resnet18 has no token feature 'cls_token'; "
                                        r"it offers: none \(not a vision transformer\)"):
        build_backbone("resnet18", "none", ["cls_token"])
