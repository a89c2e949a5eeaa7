"""timm models with pretrained weights from a real Hugging Face hub cache, offline: the exact file is loaded
and recorded; without it, one error line. The cache is built here as huggingface_hub lays it out, with
weights made by the test for one of timm's tiny test architectures."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.features.backbones.loading import build_backbone
from pipeline.runtime.errors import InputError
from pipeline.storage.cache import cache_attrs, open_cache
from tests.conftest import run_cli

MODEL = "test_vit.r160_in1k"
REPO = f"timm/{MODEL}"


def hub_cache(hf_home: Path, seed: int, revision: str = "0" * 40) -> Path:
    """HF_HOME/hub/models--timm--<model>/snapshots/<revision>/model.safetensors and refs/main; the file's path."""
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, pretrained=False)
    repo = hf_home / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file(model.state_dict(), snapshot / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot / "model.safetensors"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch) -> Path:
    """HF_HOME in a temporary folder, hub access switched off (for the CLI subprocesses)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


@pytest.mark.slow
def test_extract_loads_exactly_the_cached_hub_weights(tmp_path: Path, image_folder: Path, offline: Path):
    import timm
    from safetensors.torch import load_file
    weights = hub_cache(offline, seed=1)
    run_cli("extract", image_folder, "--out", tmp_path / "f.h5", "--backbone", "timm/test_vit",
            "--dtype", "float32", "--workers", 0, "--quiet", check=True)
    cache = open_cache(tmp_path / "f.h5")
    assert cache.attrs["backbone"] == REPO                                   # the default tag, resolved
    assert cache.attrs["weights"] == "pretrained"
    assert cache.attrs["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    straight = timm.create_model(MODEL, pretrained=False).eval()            # the file, loaded by hand
    straight.load_state_dict(load_file(weights))
    config = timm.data.resolve_data_config({}, model=straight)
    transform = timm.data.create_transform(**config)
    test = cache.read("test")
    images = torch.stack([transform(Image.open(image_folder / p).convert("RGB")) for p in test.paths])
    with torch.inference_mode():
        expected = straight.forward_head(straight.forward_features(images), pre_logits=True).numpy()
    # to 1e-3: `Preprocessing.resize_crop` rounds a pixel in 1,000 one grey level away from timm's transform
    np.testing.assert_allclose(test.features, expected, rtol=1e-3, atol=1e-3)


def test_hub_weights_missing_offline_is_one_clear_line(tmp_path: Path, image_folder: Path, offline: Path):
    proc = run_cli("extract", image_folder, "--out", tmp_path / "f.h5", "--backbone", f"timm/{MODEL}",
                   "--workers", 0, "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert f"model.safetensors of Hugging Face repository {REPO} is not in the cache" in proc.stderr
    assert "run once with network" in proc.stderr and "--weights PATH" in proc.stderr
    assert not (tmp_path / "f.h5").exists()


def test_fingerprint_follows_the_weights_file_and_the_tag(tmp_path: Path, monkeypatch):
    """Another weights file in the hub cache, or another pretrained tag of the same architecture: another
    fingerprint."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fingerprints = []
    for seed in (1, 2):
        weights = hub_cache(tmp_path / str(seed), seed)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / str(seed) / "hub"))
        backbone = build_backbone(f"timm/{MODEL}", "imagenet")          # 'imagenet' reads as 'pretrained'
        assert backbone.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
        fingerprints.append(cache_attrs(backbone.spec(), ["a", "b"], "float16")["fingerprint"])
    for tag in ("a1_in1k", "tv_in1k"):
        backbone = build_backbone(f"timm/resnet18.{tag}", "none")
        assert backbone.name == f"timm/resnet18.{tag}"
        fingerprints.append(cache_attrs(backbone.spec(), ["a", "b"], "float16")["fingerprint"])
    assert len(set(fingerprints)) == 4


def test_a_safetensors_file_is_accepted_as_weights_path(tmp_path: Path):
    from safetensors.torch import save_file
    source = build_backbone("resnet18", "none", image_size=64)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in source.model.state_dict().items()}
    save_file(state, tmp_path / "resnet18.safetensors")
    loaded = build_backbone("resnet18", str(tmp_path / "resnet18.safetensors"), image_size=64)
    assert loaded.weights_sha256 == hashlib.sha256((tmp_path / "resnet18.safetensors").read_bytes()).hexdigest()
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())


def test_unknown_tag_names_the_known_ones():
    with pytest.raises(InputError, match=r"timm model test_vit has no pretrained tag 'nope'; its tags are: r160_in1k"):
        build_backbone("timm/test_vit.nope", "none")
