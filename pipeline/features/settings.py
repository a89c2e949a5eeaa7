"""The settings of the feature stages (extract, bench, and the engine predict shares): which backbone, how it
runs, what is stored. Kept free of torch so that the command line starts quickly."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data.folders import Dataset, DatasetSettings, excluding
from pipeline.features.backbones import available, family_of
from pipeline.runtime.devices import PRECISIONS, device_setting
from pipeline.runtime.settings import setting

ENGINES = ("auto", "torch", "onnxruntime")
BENCH_ENGINES = ("torch", "onnxruntime", "openvino")


def _unknown_backbone(name: str) -> str | None:
    if family_of(name):
        return None
    return f"'{name}' is unknown; choose one of: {', '.join(available())}"


@dataclass
class BackboneSettings:
    """Which network makes the features: shared by extract, finetune and bench."""
    backbone: str = setting("efficientnet_lite0", f"A backbone of the registry: {', '.join(available())} "
                                                  f"(docs/backbones.md).", check=_unknown_backbone)
    weights: str = setting("imagenet", "'imagenet' or 'pretrained' (bundled, the torch cache, or for timm models "
                                       "the Hugging Face hub cache), a path to a local .pth or .safetensors state "
                                       "dict (a classifier that does not fit is left out), or 'none' (random "
                                       "init).")
    image_size: int | None = setting(None, "Crop size; default: the backbone's own.", min=1, max=4096)


@dataclass
class RunSettings:
    """How the network runs over the images: shared by extract and bench."""
    batch_size: int | None = setting(None, "Images per forward pass; default: 256 on CUDA, 16 on a CPU (faster "
                                           "there than larger).", min=1, max=65536)
    device: str = device_setting()
    precision: str = setting("auto", "Compute type of the forward pass; auto: bfloat16 on CUDA, float32 on CPU.",
                             choices=PRECISIONS)
    compile: bool = setting(False, "Run the model through torch.compile (pays off on large datasets).")
    workers: int | None = setting(None, "DataLoader decoding workers; default: the cores (on a CPU at most 8).",
                                  min=0, max=256)


@dataclass
class EngineSettings:
    """What runs the backbone: shared by extract and predict."""
    engine: str = setting("auto", "What runs the backbone; auto: ONNX Runtime on a CPU (float32, no --compile), "
                                  "torch otherwise. The ONNX export is cached under "
                                  "~/.cache/featurecache-pipeline/onnx.", choices=ENGINES)


@dataclass
class ExtractSettings(EngineSettings, RunSettings, BackboneSettings, DatasetSettings):
    """Stage one: params.yaml `extract` and the options of `pipeline extract`."""
    layer: list[str] | None = setting(None, "Module to hook; spatial outputs are averaged. Repeat for several "
                                            "feature sets in one file (the first is the default). Default: the "
                                            "backbone's global pool (vgg16: the 4096-d penultimate layer; "
                                            "'avgpool' gives 25088-d). Vision transformers also take "
                                            "cls_token, patch_mean, cls_patch_mean, cls_last<N>.")
    compute_stats: bool = setting(False, "Normalise with the training split's per-channel mean/std instead of "
                                         "the backbone's.")
    tta: bool = setting(False, "Average the features of each image and its horizontal flip (twice the compute).")
    decoding: str = setting("auto", "How images become tensors: pil (decoded and resized by PIL in the workers), "
                                    "tensor (JPEGs decoded and resized as tensors on the device, the rest by PIL), "
                                    "auto: tensor on CUDA, pil on a CPU. The cache records which.",
                            choices=("auto", "pil", "tensor"))
    dtype: str = setting("float16", "Storage type of the feature vectors.", choices=("float16", "float32"))
    reuse: bool = setting(True, "Reuse vectors of unchanged images from the cache at --out when it was made "
                                "the same way.")
    exclude: str | None = setting(None, "CSV whose 'path' column names images to leave out (relative to the data "
                                        "folder), e.g. an edited copy of an audit report; they are listed as "
                                        "skipped, 'excluded'.")
    pool: bool = setting(False, "With --labels: images whose row has an empty label go to the unlabelled pool "
                                "(for `pipeline select`) instead of being skipped. Split folders take the pool "
                                "from ROOT/unlabeled/.")

    def scan(self, root: Path) -> Dataset:
        dataset = super().scan(root, self.pool)
        return excluding(dataset, Path(self.exclude)) if self.exclude else dataset


@dataclass
class BenchSettings(RunSettings, BackboneSettings, DatasetSettings):
    """`pipeline bench`: the images and network of extract, timed."""
    images: int | None = setting(None, "Use only the first N images.", min=1)
    repeats: int = setting(2, "Timed runs of each, interleaved; the best counts.", min=1, max=1000)
    tutorial: bool = setting(True, "Also time the tutorial-style loop.")
    tutorial_images: int = setting(2048, "Time the tutorial loop on the first N images only: its rate is steady, "
                                         "and on a GPU the whole set would take minutes.", min=1)
    engine: list[str] | None = setting(None, "Engine to time, repeatable: torch, onnxruntime, openvino (model "
                                             "alone, if installed); default: torch and, on a CPU, onnxruntime.",
                                       choices=BENCH_ENGINES)
