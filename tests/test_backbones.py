"""Backbone registry: hooked layers and their sizes, weights files, TTA, the offline ImageNet error."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.features.backbones import KNOWN
from pipeline.features.backbones.loading import build_backbone
from pipeline.features.engines.torch import Embedder
from pipeline.runtime.errors import InputError
from tests.conftest import ROOT, cli_in_process


def test_vgg16_hooks_the_penultimate_layer_and_offers_avgpool_flattened():
    vgg = build_backbone("vgg16", "none", ["classifier.4", "avgpool", "classifier.3"], image_size=64)
    assert vgg.layer == "classifier.4" and vgg.feature_dim == 4096
    assert vgg.feature_dims == {"classifier.4": 4096, "avgpool": 25088, "classifier.3": 4096}
    with Embedder(vgg) as embed:
        out = embed(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert {k: v.shape for k, v in out.items()} == {k: (2, d) for k, d in vgg.feature_dims.items()}
    # the penultimate layer is the ReLU of classifier.3; the in-place ReLU must not alter classifier.3's copy
    assert out["classifier.3"].min() < 0
    np.testing.assert_allclose(out["classifier.4"], np.maximum(out["classifier.3"], 0), rtol=1e-6)


def test_compiled_embedders_give_their_own_features_after_other_compiles_of_the_same_network(monkeypatch):
    """torch.compile skips guards on module hooks by default, so a graph compiled earlier in the process for
    the same network without these hooks, or with others, was reused and gave no features (`extract
    --compile` after `bench`'s model-only run, or two layers in turn). Dynamo's guards are what is tested, so
    its eager backend stands in for the slow inductor one."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager", **kw))
    resnet = build_backbone("resnet18", "none", ["avgpool", "layer3"], image_size=32)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with Embedder(resnet) as embed:
        want = embed(x)
    with torch.inference_mode():
        torch.compile(resnet.model)(x)                   # the same network compiled without hooks
    for layers in (["avgpool"], ["layer3"], ["avgpool", "layer3"]):
        with Embedder(replace(resnet, layers=tuple(layers)), compile=True, batch_size=4) as embed:
            got = embed(x)
        assert list(got) == layers
        for layer in layers:
            np.testing.assert_allclose(got[layer], want[layer], rtol=1e-5, atol=1e-5)


def test_registry_feature_dims_match_the_hooked_layers():
    for name in ("resnet18", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny"):
        entry = KNOWN[name]
        probe = build_backbone(name, "none", [entry.layer, entry.classifier], image_size=64)
        assert probe.feature_dims[entry.layer] == entry.feature_dim, name
        assert probe.feature_dims[entry.classifier] == 1000, name   # the classifier is the ImageNet head


def test_unknown_layer_names_the_modules():
    with pytest.raises(InputError, match="has no layer 'nope'; its top-level modules are: conv1, bn1"):
        build_backbone("resnet18", "none", "nope")


def _features(backbone, x: torch.Tensor) -> np.ndarray:
    with Embedder(backbone) as embed:
        return embed(x)[backbone.layer]


def test_weights_file_with_another_head_loads_the_backbone_and_notes_the_head(tmp_path: Path):
    """A resnet18 fine-tuned for 2 classes, saved from DataParallel: its features equal the source's."""
    source = build_backbone("resnet18", "none", image_size=64)
    state = {f"module.{k}": v for k, v in source.model.state_dict().items()}
    state["module.fc.weight"], state["module.fc.bias"] = torch.zeros(2, 512), torch.zeros(2)
    torch.save(state, tmp_path / "finetuned.pth")
    torch.manual_seed(1)   # a different random init underneath, so equal features prove the load
    loaded = build_backbone("resnet18", str(tmp_path / "finetuned.pth"), image_size=64)
    assert loaded.notes == ["weights finetuned.pth: classifier 'fc' left random, its 2 keys in the file do not "
                            "fit (fc.weight, fc.bias); features do not use it"]
    x = torch.randn(2, 3, 64, 64)
    np.testing.assert_array_equal(_features(loaded, x), _features(source, x))


def test_weights_file_missing_backbone_keys_is_an_error(tmp_path: Path):
    state = build_backbone("resnet18", "none").model.state_dict()
    del state["layer4.1.conv2.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(InputError, match=r"do not fit resnet18: 1 backbone keys missing \(e.g. \['layer4.1.conv2"):
        build_backbone("resnet18", str(tmp_path / "partial.pth"))


def test_weights_file_extra_keys_are_noted(tmp_path: Path):
    state = build_backbone("resnet18", "none").model.state_dict()
    state["projection.weight"] = torch.zeros(4)
    torch.save(state, tmp_path / "extra.pth")
    assert build_backbone("resnet18", str(tmp_path / "extra.pth")).notes == [
        "weights extra.pth: ignored 1 keys that resnet18 does not have (e.g. ['projection.weight'])"]


def test_weights_file_of_another_architecture_is_an_error(tmp_path: Path):
    torch.save(build_backbone("resnet50", "none").model.state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(InputError, match=r"do not fit resnet18: 0 backbone keys missing \(e.g. \[\]\), [1-9]\d* of "
                                        r"another shape \(e.g. \['layer1.0.conv1.weight'"):
        build_backbone("resnet18", str(tmp_path / "resnet50.pth"))


def test_tta_averages_each_image_with_its_mirror():
    plain = build_backbone(image_size=64)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    unflipped, flipped = _features(plain, x), _features(plain, x.flip(-1))
    tta = replace(plain, tta=True)
    np.testing.assert_allclose(_features(tta, x), (unflipped + flipped) / 2, atol=1e-5)
    np.testing.assert_allclose(_features(tta, x.flip(-1)), _features(tta, x), atol=1e-5)   # mirror-invariant
    assert np.abs(unflipped - flipped).max() > 1e-3


def test_imagenet_weights_offline_is_one_clear_line(tmp_path: Path, image_folder: Path, monkeypatch):
    """No network (an unreachable proxy stands in for it) and no cached file: say how to supply one."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    proc = cli_in_process("extract", image_folder, "--out", tmp_path / "f.h5", "--backbone", "resnet18",
                   "--weights", "imagenet", "--workers", 0, "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: cannot download ImageNet weights for resnet18")
    assert "resnet18-f37072fd.pth" in proc.stderr and "--weights PATH" in proc.stderr
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("model, layer, dim", [
    ("efficientnet_b0", "global_pool", 1280),            # the classifier takes the pool's output
    ("convnext_atto", "head.drop", 320),                 # the pool sits in the head, with a norm after it
    ("vit_tiny_patch16_224", "head_drop", 192),          # token pooling: no pool module at all
])
def test_timm_models_hook_the_input_of_their_classifier(tmp_path: Path, model, layer, dim):
    """Wherever a timm model keeps its pooling, the features are what timm calls its pre-logits; a local
    state dict loads into it."""
    import timm
    torch.manual_seed(3)
    source = timm.create_model(model, pretrained=False).eval()
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    backbone = build_backbone(f"timm/{model}", str(tmp_path / "weights.pth"))
    assert (backbone.layer, backbone.feature_dim) == (layer, dim)
    size = backbone.preprocessing.image_size
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        pre_logits = source.forward_head(source.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(_features(backbone, x), pre_logits, rtol=1e-4, atol=1e-4)


def test_a_vit_takes_another_image_size_through_timm_dynamic_size():
    """A transformer built for 160 px runs at 96 px with its position embedding resampled (timm's
    dynamic_img_size, the same weights); a size its patches do not divide is one clear error."""
    import timm
    backbone = build_backbone("timm/test_vit", "none", image_size=96)
    assert backbone.preprocessing.image_size == 96
    resampled = timm.create_model("test_vit.r160_in1k", dynamic_img_size=True).eval()
    resampled.load_state_dict(backbone.model.state_dict())
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = resampled.forward_head(resampled.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(_features(backbone, x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match=r"backbone timm/test_vit.r160_in1k cannot take 97x97 images \(Input height "
                                        r"\(97\) should be divisible by patch size \(16\)\); choose another"):
        build_backbone("timm/test_vit", "none", image_size=97)


def test_unknown_timm_model_is_one_clear_error():
    with pytest.raises(InputError, match="unknown timm model 'convnext_nope'"):
        build_backbone("timm/convnext_nope", "none")


def test_the_documented_backbone_list_is_the_registry():
    """docs/backbones.md's list and `pipeline extract --help` name what the family modules offer."""
    from pipeline.features.backbones import FAMILIES, KNOWN, available
    from pipeline.features.settings import BackboneSettings
    from pipeline.runtime.settings import fields, rule
    page = (ROOT / "docs" / "backbones.md").read_text()
    listed = page.split("Backbones: ", 1)[1].split("\n\n", 1)[0]
    names = re.findall(r"`([\w/<>\[\].]+)`", listed)
    assert [n for n in names if n in KNOWN] == list(KNOWN) and all(
        any(n.startswith(family.prefix) for n in names) for family in FAMILIES if family.prefix)
    doc = rule(next(f for f in fields(BackboneSettings) if f.name == "backbone")).doc
    assert all(name in doc for name in available())
