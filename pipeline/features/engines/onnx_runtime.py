"""Which engine runs the frozen backbone: torch (`backbones.Embedder`) or, on a CPU, ONNX Runtime.

ONNX Runtime ran EfficientNet-Lite0 2-3x faster than torch on a 2-core CPU (benchmarks/RESULTS.md). The
folded network, with every feature layer as a graph output (pooled or flattened as the torch hooks do),
is exported once per `export_key` into the user's cache folder, with torch's vectors for a random batch,
and reused by later runs. Before each use, its outputs on that batch are compared with torch's (to
`TOLERANCE` of the largest value, as folding is); an export that fails or differs falls back to torch with a
one-line note.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import secrets
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.features.backbones.loading import Backbone

from pipeline.features.engines.torch import Embedder, FeatureGraph
from pipeline.features.settings import ENGINES
from pipeline.runtime.errors import InputError
from pipeline.runtime.files import read_regular, write_atomically

OPSET = 17
GRAPH_VERSION = 2        # of what `export` writes: a change makes earlier exports stale
TOLERANCE = 1e-4         # of the largest value of each output, the rule `folding.folded` checks by
GRAPH_LIMIT = 2 << 30       # bytes of a cached ONNX graph (protobuf's own limit)
RECORD_LIMIT = 64 << 20     # bytes of the JSON record beside it


def resolve_engine(engine: str, device: torch.device, precision: str = "float32", compile: bool = False) -> str:
    """'auto': ONNX Runtime for float32 on a CPU without torch.compile, else torch."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine '{engine}'; choose one of: {', '.join(ENGINES)}")
    onnx_fits = device.type == "cpu" and precision == "float32" and not compile
    if engine == "auto":
        return "onnxruntime" if onnx_fits else "torch"
    if engine == "onnxruntime" and not onnx_fits:
        raise InputError(f"--engine onnxruntime runs float32 on the CPU, without --compile "
                        f"(got device {device.type}, precision {precision}{', compile' if compile else ''})")
    return engine


def cache_folder() -> Path:
    """Where exports are kept: $XDG_CACHE_HOME/featurecache-pipeline/onnx, by default under ~/.cache."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "featurecache-pipeline" / "onnx"


def onnxruntime_threads() -> int:
    """The cores this process may use, or OMP_NUM_THREADS when that is fewer (as torchrun sets it for each
    of several processes)."""
    cores = len(os.sched_getaffinity(0))
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(limit))) if limit.isdigit() else cores


def export_key(backbone: Backbone) -> dict:
    """Everything the exported graph and its recorded check vectors (made with TTA when it is on) depend on."""
    import onnx
    import onnxruntime

    from pipeline.storage.cache import library_versions
    return {"backbone": backbone.name, "weights_sha256": backbone.weights_sha256, "layers": list(backbone.layers),
            "flattened": [layer for layer in backbone.layers if layer in backbone.flattened],
            "image_size": backbone.preprocessing.image_size, "tta": backbone.tta, "opset": OPSET,
            "graph_version": GRAPH_VERSION,
            "versions": {**library_versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}}


def export(backbone: Backbone) -> bytes:
    """The ONNX graph of the folded backbone: input `images` [N, 3, S, S], one output per feature layer."""
    import onnx
    graph = FeatureGraph(backbone).eval()
    size = backbone.preprocessing.image_size
    names = [f"features{i}" for i in range(len(backbone.layers))]
    buffer = io.BytesIO()
    try:
        static_same_padding(graph.model, size)
        with torch.no_grad(), silenced():
            torch.onnx.export(graph, (torch.zeros(1, 3, size, size),), buffer, input_names=["images"],
                              output_names=names, opset_version=OPSET, dynamo=False,
                              dynamic_axes={name: {0: "batch"} for name in ["images", *names]})
    finally:
        graph.remove_hooks()
    model = onnx.load_from_string(buffer.getvalue())
    drop_empty_pad_inputs(model)
    return model.SerializeToString()


def drop_empty_pad_inputs(model) -> None:
    """Remove the empty optional input torch's exporter gives each `Pad` of an ONNX model: with it, ONNX
    Runtime does not fuse the Pad into the convolution after it."""
    for node in model.graph.node:
        if node.op_type == "Pad" and node.input[-1] == "":
            del node.input[-1]


def static_same_padding(model: nn.Module, size: int) -> None:
    """Give timm's TensorFlow-style 'same' convolutions (`Conv2dSame`, as in EfficientNet-Lite) the constant
    padding they get at the image size `size`. They compute it from the input's shape at run time, which
    the export keeps as shape arithmetic ONNX Runtime cannot fold into the convolution: the layout changes
    around the separate Pad took a quarter of Lite0's time on a CPU."""
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same_arg
    shapes: dict[nn.Module, tuple[int, int]] = {}

    def keep_shape(conv: nn.Module, args: tuple) -> None:
        shapes[conv] = tuple(args[0].shape[-2:])
    hooks = [m.register_forward_pre_hook(keep_shape) for m in model.modules() if type(m) is Conv2dSame]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next((p.device for p in model.parameters()), "cpu")))
    finally:
        for hook in hooks:
            hook.remove()
    for conv, shape in shapes.items():
        pad = tuple(pad_same_arg(shape, conv.kernel_size, conv.stride, conv.dilation))
        conv.forward = lambda x, conv=conv, pad=pad: F.conv2d(F.pad(x, pad), conv.weight, conv.bias, conv.stride,
                                                              0, conv.dilation, conv.groups)


@contextmanager
def silenced():
    """Discard what is printed to stdout and stderr, by C++ code too: the exporter prints whole graphs
    when it fails (the failure itself is reported as a one-line note)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:   # to silence a library's own prints; no file of the user's
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


class OnnxEmbedder:
    """`Embedder`'s interface on an ONNX Runtime session: a batch of images in, one float32 [N, D] array
    per layer out; with TTA each image also runs flipped left-right and the two vectors are averaged."""

    def __init__(self, session, layers: tuple[str, ...], tta: bool):
        self.session, self.layers, self.tta = session, layers, tta

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {"images": images})

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        x = images.detach().float().contiguous().numpy()
        out = self._run(x)
        if self.tta:
            flipped = self._run(np.ascontiguousarray(x[..., ::-1]))
            out = [(a + b) / 2 for a, b in zip(out, flipped)]
        return dict(zip(self.layers, out))

    def submit(self, images: torch.Tensor) -> Callable[[], dict[str, np.ndarray]]:
        """`Embedder.submit`'s interface: ONNX Runtime has run the batch when this returns."""
        vectors = self(images)
        return lambda: vectors

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> "OnnxEmbedder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def session(model: bytes, threads: int):
    """An ONNX Runtime CPU session on `threads` threads that sleep rather than spin when idle (the
    decoding workers share the cores)."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def check_batch(size: int, seed: int = 0) -> torch.Tensor:
    """The random batch of two on which an export is compared with torch."""
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def torch_reference(backbone: Backbone, seed: int = 0) -> dict[str, np.ndarray]:
    """Torch's vectors (the torch engine's, folded network included) for `check_batch`."""
    with Embedder(backbone) as torch_embed:
        return torch_embed(check_batch(backbone.preprocessing.image_size, seed))


def mismatch(onnx_embed: OnnxEmbedder, reference: dict[str, np.ndarray], size: int, seed: int = 0) -> str | None:
    """Why the ONNX outputs on `check_batch` differ from torch's `reference`, or None when they agree."""
    got = onnx_embed(check_batch(size, seed))
    for layer, want in reference.items():
        scale = max(float(np.abs(want).max()), 1e-12)
        worst = float(np.abs(got[layer] - want).max()) / scale if got[layer].shape == want.shape else np.inf
        if not worst <= TOLERANCE:
            return f"layer {layer} differs from torch's by {worst:.1e} of its largest value"
    return None


class ExportCache:
    """Exported graphs in `folder`: `<name>.onnx` beside `<name>.json`, its record (key, SHA-256 and torch's
    vectors for `check_batch`, so that a later run checks the graph without running torch). A graph whose
    record is missing, of another key or of other bytes is not trusted. Both are written atomically."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder else cache_folder()

    def paths(self, key: dict) -> tuple[Path, Path]:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        stem = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key['backbone'])}-{digest}"
        return self.folder / f"{stem}.onnx", self.folder / f"{stem}.json"

    def load(self, key: dict) -> tuple[bytes | None, dict[str, np.ndarray] | None, str | None]:
        """The cached graph of `key` and its reference vectors, or None and why it is not trusted (None when
        there is none)."""
        graph, record = self.paths(key)
        if not graph.exists() and not record.exists():
            return None, None, None
        try:   # read_regular: a FIFO or a link to /dev/zero in their place is refused, not read
            kept = json.loads(read_regular(record, RECORD_LIMIT))   # any other form: not used, exported anew
            model = read_regular(graph, GRAPH_LIMIT)
            reference = {layer: _array(value) for layer, value in kept["reference"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return None, None, f"unreadable: {_first_line(exc)}"
        if kept.get("key") != key:
            return None, None, "its record names another key"
        if kept.get("sha256") != hashlib.sha256(model).hexdigest():
            return None, None, "its bytes differ from the SHA-256 recorded beside it"
        return model, reference, None

    def save(self, key: dict, model: bytes, reference: dict[str, np.ndarray]) -> Path:
        graph, record = self.paths(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(graph, model)
        kept = {"key": key, "sha256": hashlib.sha256(model).hexdigest(),
                "reference": {layer: {"shape": list(v.shape), "float32": base64.b64encode(
                    np.ascontiguousarray(v, np.float32).tobytes()).decode()} for layer, v in reference.items()}}
        write_atomically(record, json.dumps(kept, indent=1))
        return graph


def _array(value: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(value["float32"], validate=True), np.float32).reshape(value["shape"])


def onnx_embedder(backbone: Backbone, threads: int | None = None,
                  cache: ExportCache | None = None) -> tuple[OnnxEmbedder | None, list[str]]:
    """The backbone on ONNX Runtime, checked against torch's vectors, and notes on what happened; None (and
    the reason) when it cannot be used. A cached export that is damaged or disagrees is exported anew."""
    cache = cache or ExportCache()
    key, notes = export_key(backbone), []
    threads = threads or onnxruntime_threads()
    cached, _, why = cache.load(key)
    if cached is not None:   # against a fresh torch run on a batch never seen before, not the vectors kept beside it
        seed = secrets.randbits(31)
        embed, why = _checked(cached, torch_reference(backbone, seed), backbone, threads, seed)
        if embed:
            return embed, notes
    if why:
        notes.append(f"onnxruntime: cached export {cache.paths(key)[0]} not used ({why}); exporting again")
    start = time.perf_counter()
    try:
        model = export(backbone)
    except Exception as exc:
        return None, [*notes, f"onnxruntime: export failed ({_first_line(exc)}); running torch"]
    reference = torch_reference(backbone)
    embed, why = _checked(model, reference, backbone, threads)
    if embed is None:
        return None, [*notes, f"onnxruntime: {why}; running torch"]
    try:
        where = f"to {cache.save(key, model, reference)}"
    except OSError as exc:
        where = f"(not cached: {_first_line(exc)})"
    return embed, [*notes, f"onnxruntime: exported {backbone.name} in {time.perf_counter() - start:.1f}s {where}"]


def _checked(model: bytes, reference: dict[str, np.ndarray], backbone: Backbone,
             threads: int, seed: int = 0) -> tuple[OnnxEmbedder | None, str | None]:
    try:
        embed = OnnxEmbedder(session(model, threads), backbone.layers, backbone.tta)
        why = mismatch(embed, reference, backbone.preprocessing.image_size, seed)
    except Exception as exc:
        return None, f"cannot run it: {_first_line(exc)}"
    return (None, why) if why else (embed, None)


def _first_line(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def embedder(backbone: Backbone, device: torch.device | str = "cpu", engine: str = "auto",
             precision: str = "float32", compile: bool = False, batch_size: int | None = None,
             threads: int | None = None) -> tuple[Embedder | OnnxEmbedder, str, list[str]]:
    """The embedder that runs `backbone`, the engine it uses, and notes (an export, a fallback to torch)."""
    device = torch.device(device)
    notes: list[str] = []
    if resolve_engine(engine, device, precision, compile) == "onnxruntime":
        embed, notes = onnx_embedder(backbone, threads)
        if embed is not None:
            return embed, "onnxruntime", notes
    return Embedder(backbone, device, precision, compile, batch_size), "torch", notes
