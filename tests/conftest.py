"""Shared test helpers: tiny generated image folders, and the command line in this process or in one of its own."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# `make test` runs two test processes on the machine's cores: one compute thread per process (and per
# subprocess of the command line) keeps them from oversubscribing the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def tiny_image(colour: tuple[int, int, int], seed: int, size: int = 48) -> Image.Image:
    """A noisy patch of one colour with a random bright square: classes differ by colour."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255)
    x, y = rng.integers(0, size // 2, 2)
    pixels[y:y + size // 3, x:x + size // 3] = 255
    return Image.fromarray(pixels.astype(np.uint8))


def make_image_folder(root: Path, per_split: dict[str, int] | None = None, classes=tuple(COLOURS),
                      split_folders: bool = True, ext: str = ".png") -> Path:
    """ROOT/{split}/{class}/{i}.png (or ROOT/{class}/{i}.png with split_folders=False)."""
    per_split = per_split or {"train": 8, "val": 4, "test": 4}
    seed = 0
    for split, n in per_split.items():
        for name in classes:
            folder = root / split / name if split_folders else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                tiny_image(COLOURS[name], seed).save(folder / f"{split}_{i}{ext}")
    return root


@pytest.fixture(scope="session", autouse=True)
def onnx_export_cache(request, tmp_path_factory) -> Path:
    """ONNX exports (pipeline.features.engines.onnx_runtime) go to pytest's cache folder (a temporary one without it),
    shared by the tests and their subprocesses and kept between runs (their key covers everything they
    depend on), never to ~/.cache."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("xdg-cache") if cache else tmp_path_factory.mktemp("xdg-cache")
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = before


@contextlib.contextmanager
def embedder_calls(before_call=None):
    """Record the images each embedder call (torch or ONNX Runtime) runs through the network (each twice
    with TTA), leaving out the checks of an ONNX export against torch.
    `before_call(n)`, if given, runs before the n-th call, to fail or interrupt it."""
    from pipeline.features.engines import onnx_runtime as engine
    from pipeline.features.engines.torch import Embedder
    seen: list[int] = []
    calls = {cls: cls.__call__ for cls in (Embedder, engine.OnnxEmbedder)}
    checks = {name: getattr(engine, name) for name in ("mismatch", "torch_reference")}
    checking = []

    def counted_call(call):
        def counted(self, images):
            if not checking:
                if before_call is not None:
                    before_call(len(seen) + 1)
                seen.append(len(images) * (2 if self.tta else 1))
            return call(self, images)
        return counted

    def uncounted(check):
        def run(*args):
            checking.append(True)
            try:
                return check(*args)
            finally:
                checking.pop()
        return run

    for cls, call in calls.items():
        cls.__call__ = counted_call(call)
    for name, check in checks.items():
        setattr(engine, name, uncounted(check))
    try:
        yield seen
    finally:
        for cls, call in calls.items():
            cls.__call__ = call
        for name, check in checks.items():
            setattr(engine, name, check)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def run_cli(*args, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ARGS` in a process of its own, with this checkout first on the path: for the
    tests in which the process matters (signals, torchrun, what a start-up imports); the others use
    `cli_in_process`."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def cli_in_process(*args, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the command line's entry point (`pipeline.cli.main`) in this process, with its parsing, error
    contract and output as in a process of its own but without the start-up: for every test in which the
    process itself does not matter. Returns the exit code and the captured stdout and stderr."""
    from pipeline import cli
    return _in_process(cli.main, ["pipeline", *map(str, args)], cwd, check)


def stage_in_process(stage: str, cwd: Path, *args, check: bool = False) -> subprocess.CompletedProcess:
    """Run the DVC stage script stages/STAGE (e.g. "train.py") in this process, as `cli_in_process` runs
    the command line."""
    import runpy
    script = ROOT / "stages" / stage
    return _in_process(lambda: runpy.run_path(str(script), run_name="__main__"), [str(script), *map(str, args)],
                       cwd, check)


def _in_process(main, argv: list[str], cwd: Path | None, check: bool) -> subprocess.CompletedProcess:
    """`main()` with `argv` as sys.argv, in `cwd`, its exit code and output captured. The garbage collector,
    which a command turns off until its imports are done, is on again afterwards."""
    import gc
    import io
    out, err = io.StringIO(), io.StringIO()
    before = (sys.argv, Path.cwd())
    code = 0
    try:
        sys.argv = argv
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = before[0]
        os.chdir(before[1])
        gc.enable()
    if check and code != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({code}):\n{err.getvalue()}")
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def interrupt_when_written(command: list, path: Path, sig: int) -> subprocess.CompletedProcess:
    """Run `command` for real, with this checkout first on the path, and send it `sig` as soon as
    `path` exists (or once it has ended); returns its exit code and stderr. Ctrl-C reaches the command as
    in a terminal, also when the suite itself was started in the background (which ignores SIGINT)."""
    proc = subprocess.Popen(list(map(str, command)), env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not path.exists() and proc.poll() is None:
            time.sleep(0.02)
    finally:
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, None, stderr)


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory) -> Path:
    """A real feature cache of a tiny three-class folder (EfficientNet-Lite0 at 64 px), made once."""
    root = tmp_path_factory.mktemp("cache")
    images = make_image_folder(root / "images")
    out = root / "features.h5"
    cli_in_process("extract", images, "--out", out, "--image-size", 64, "--workers", 0, "--quiet", check=True)
    return out


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory) -> Path:
    """A real fine-tuned model directory (EfficientNet-Lite0 at 64 px, head only, one epoch, with its
    checkpoint), made once; its images lie beside it in `images`."""
    from pipeline.tuning.training import FinetuneSettings, finetune
    root = tmp_path_factory.mktemp("finetuned")
    images = make_image_folder(root / "images", {"train": 4, "val": 3, "test": 2})
    out = root / "ft"
    finetune(images, out, FinetuneSettings(strategy="head", epochs=1, image_size=64, batch_size=12, workers=0,
                                           device="cpu"), quiet=True, checkpoint=True)
    return out


def synthetic_cache(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
                    data_root: Path | None = None) -> Path:
    """A real feature cache holding given vectors, for tests that need controlled features; the image of
    row i of a split is SPLIT/i.png (under `data_root`, if given)."""
    from pipeline.features.spec import BackboneSpec, Preprocessing
    from pipeline.storage.cache import FeatureWriter, cache_attrs
    spec = BackboneSpec("synthetic", "none", "none", ("none",), Preprocessing(1, 1, "bilinear", (0, 0, 0), (1, 1, 1)))
    dim = next(iter(splits.values()))[0].shape[1]
    writer = FeatureWriter(path, cache_attrs(spec, classes, "float32", data_root=data_root), {"none": dim}, "float32")
    for split, (X, y) in splits.items():
        writer.append(split, {"none": X}, y, [f"{split}/{i}.png" for i in range(len(y))], ["0" * 64] * len(y))
    writer.commit()
    return path
