"""BackboneSpec: the backbone as a feature cache's root attributes and as model.json record it, both ways."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image

from pipeline.features.spec import BackboneSpec, Preprocessing
from pipeline.storage.cache import FeatureWriter, cache_attrs, open_cache

SPEC = BackboneSpec("timm/test_vit.r160_in1k", "pretrained", "ab" * 32, ("head_drop", "cls_last4"),
                    Preprocessing(160, 168, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), tta=True)


def test_spec_round_trips_through_a_real_cache(tmp_path: Path):
    writer = FeatureWriter(tmp_path / "f.h5", cache_attrs(SPEC, ["a", "b"], "float32"),
                           {"head_drop": 2, "cls_last4": 3}, "float32")
    writer.append("train", {"head_drop": np.ones((2, 2)), "cls_last4": np.ones((2, 3))}, np.array([0, 1]),
                  ["a/0.png", "b/0.png"], ["0" * 64, "1" * 64])
    writer.commit()
    attrs = open_cache(tmp_path / "f.h5").attrs
    assert (attrs["backbone"], attrs["layer"], attrs["image_size"]) == ("timm/test_vit.r160_in1k", "head_drop", 160)
    assert BackboneSpec.from_attrs(attrs) == SPEC


def test_spec_round_trips_through_model_json_form():
    assert BackboneSpec.from_dict(SPEC.to_dict()) == SPEC
    older = {k: v for k, v in SPEC.to_dict().items() if k not in ("layers", "tta")}   # written before both
    assert BackboneSpec.from_dict(older) == BackboneSpec(SPEC.name, SPEC.weights, SPEC.weights_sha256,
                                                         ("head_drop",), SPEC.preprocessing, False)


def test_fingerprint_changes_with_every_field_that_changes_vectors():
    variants = [SPEC, replace(SPEC, name="timm/test_vit.other"), replace(SPEC, weights_sha256="cd" * 32),
                replace(SPEC, layers=("cls_token",)), replace(SPEC, preprocessing=SPEC.preprocessing.with_size(96)),
                replace(SPEC, tta=False)]
    assert len({cache_attrs(v, ["a"], "float16")["fingerprint"] for v in variants}) == len(variants)


@pytest.mark.parametrize("image_size, resize, interpolation", [(224, 256, "bicubic"), (160, 182, "bilinear"),
                                                               (224, 200, "bicubic")])   # the last crop pads
def test_resize_crop_gives_torchvisions_resize_and_centre_crop(image_size, resize, interpolation):
    """The crop-only resampling is torchvision's Resize + CenterCrop on photos shrunk and enlarged, in both
    orientations: a value in 500 or fewer differs, by one grey level (two at most, when enlarging)."""
    from torchvision import transforms as T
    pre = Preprocessing(image_size, resize, interpolation, (0.5,) * 3, (0.5,) * 3)
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    torchvision = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(image_size)])
    photos = [Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")
              for name in ("chelsea.png", "coffee.png")]
    photos += [p.transpose(Image.Transpose.ROTATE_90) for p in photos] + [p.resize((90, 61)) for p in photos]
    differing = 0
    for photo in photos:
        got, want = (np.asarray(f(photo), np.int16) for f in (pre.resize_crop, torchvision))
        assert got.shape == want.shape == (image_size, image_size, 3)
        assert np.abs(got - want).max() <= 2
        differing += np.count_nonzero(got != want)
    assert differing < 0.002 * len(photos) * image_size ** 2 * 3
