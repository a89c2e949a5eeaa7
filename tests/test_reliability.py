"""Hostile inputs and outputs for every command, each expected to end in one of: the victim file unchanged,
the user's files kept, or one `error:` line and exit code 2, with no traceback. In the test's process
(`cli_in_process`) except where a process is the point. See docs/reliability.md."""
from __future__ import annotations

import io
import json
import os
import re
import resource
import signal
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline
from pipeline.runtime import errors
from pipeline.runtime.files import MANIFEST, OutputError, staged_folder, write_atomically
from pipeline.runtime.printing import say, shown
from tests.conftest import ROOT, cli_in_process, make_image_folder, synthetic_cache
from tests.test_bad_input import one_line_error

FAST = ("--folds", 2, "--seeds", 1)


def small_audit_cache(path: Path, data_root: Path | None = None, classes=("a", "b")) -> Path:
    """Two classes of twelve vectors each in train, four in val; row i of a split is SPLIT/i.png."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 12), ("val", 4)):
        y = np.arange(2 * n) % 2
        splits[split] = ((rng.normal(0, 1, (2 * n, 8)) + 3 * y[:, None]).astype(np.float32), y)
    return synthetic_cache(path, splits, list(classes), data_root=data_root)


def photo(path: Path, colour=(200, 30, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path, "JPEG")
    return path.read_bytes()


def images_for(cache_root: Path) -> Path:
    """The data folder of `small_audit_cache`: a real PNG for every row."""
    for split, n in (("train", 24), ("val", 8)):
        (cache_root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (24, 24), (10 * i % 255, 80, 160)).save(cache_root / split / f"{i}.png")
    return cache_root


@pytest.fixture
def cache(tmp_path) -> Path:
    return small_audit_cache(tmp_path / "features.h5", images_for(tmp_path / "images"))


# --- the writer: nothing lost, nothing followed ----------------------------------------------------------

@pytest.mark.parametrize("place", ["thumbs/holiday.jpg", "thumbs/2024/beach.jpg", "notes.txt"])
def test_audit_never_deletes_files_it_did_not_write(cache, tmp_path, place):
    out = tmp_path / "report"
    kept = photo(out / place)
    line = one_line_error(cli_in_process("audit", cache, "--out", out, *FAST))
    assert f"holds files this audit report did not write ({place})" in line
    assert (out / place).read_bytes() == kept


def test_a_link_at_thumbs_keeps_the_photos_behind_it(cache, tmp_path):
    album = tmp_path / "album"
    kept = {name: photo(album / name) for name in ("a.jpg", "b.jpg", "c.jpg")}
    out = tmp_path / "report"
    out.mkdir()
    (out / "thumbs").symlink_to(album)
    assert "thumbs" in one_line_error(cli_in_process("audit", cache, "--out", out, *FAST))
    assert {p.name: p.read_bytes() for p in album.iterdir()} == kept


@pytest.mark.parametrize("name", ["label_issues.csv", "summary.json", "duplicates.csv", "learning_curve.png",
                                  "index.html.tmp", "index.html", "outliers.csv", ".written"])
def test_a_link_planted_in_a_previous_report_is_neither_followed_nor_deleted(cache, tmp_path, name):
    out = tmp_path / "report"
    assert cli_in_process("audit", cache, "--out", out, "--quiet", *FAST).returncode == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(victim)
    proc = cli_in_process("audit", cache, "--out", out, "--quiet", *FAST)
    assert one_line_error(proc) and victim.read_text() == "precious\n"


def test_a_new_audit_replaces_its_own_report_whole(cache, tmp_path):
    out = tmp_path / "report"
    for _ in range(2):
        assert cli_in_process("audit", cache, "--out", out, "--quiet", *FAST).returncode == 0
    listed = set((out / MANIFEST).read_text().splitlines())
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {MANIFEST}
    assert listed == on_disk and "index.html" in listed and any(n.startswith("thumbs/") for n in listed)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report")] == []



def test_the_api_audit_writes_the_owned_report_only_where_told(cache, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    held = pipeline.audit(cache, folds=2, seeds=1)
    assert held.page is None and held.outliers and list((tmp_path / "scratch").iterdir()) == []
    written = pipeline.audit(cache, tmp_path / "report", folds=2, seeds=1)
    assert written.page == tmp_path / "report" / "index.html" and written.page.is_file()
    assert written.outliers == held.outliers and "index.html" in (tmp_path / "report" / MANIFEST).read_text()

@contextmanager
def file_size_limit(size: int):
    """A real OS limit on the size of any file this process writes (EFBIG, as a full disk fails writes with
    ENOSPC), lifted afterwards: the soft limit can be raised back up to the hard one."""
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_leaves_the_previous_report_whole(cache, tmp_path):
    out = tmp_path / "report"
    assert cli_in_process("audit", cache, "--out", out, "--quiet", *FAST).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with file_size_limit(2048):   # the learning curve's plot is larger
        proc = cli_in_process("audit", cache, "--out", out, "--quiet", *FAST)
    line = one_line_error(proc)
    assert line == f"error: cannot write audit report {out}: File too large; {out} is left as it was"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.h5", "images", "report"]


def test_a_full_disk_under_a_single_file_leaves_it_as_it_was(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with file_size_limit(1024), pytest.raises(OutputError, match="File too large; .* is left as it was"):
        write_atomically(target, b"x" * 4096)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_a_link_at_a_single_file_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "compare.md").symlink_to(victim)
    write_atomically(tmp_path / "compare.md", "| model |\n")
    assert victim.read_text() == "precious\n" and not (tmp_path / "compare.md").is_symlink()


def test_a_read_only_folder_is_one_error_naming_it(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes through permissions")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    with pytest.raises(OutputError, match="Permission denied"):
        with staged_folder(folder / "report", "report") as staged:
            write_atomically(staged / "a.txt", "a")


@pytest.mark.parametrize("root", ["/", "/etc", "/usr"])
def test_thumbnails_never_come_from_a_system_folder(tmp_path, root):
    cache = small_audit_cache(tmp_path / "features.h5", Path(root))
    out = tmp_path / "report"
    assert cli_in_process("audit", cache, "--out", out, "--quiet", *FAST).returncode == 0
    assert not (out / "thumbs").exists()
    assert "is a system folder" in (out / "index.html").read_text()


def test_thumbnails_never_follow_a_link_out_of_the_data_folder(tmp_path):
    from pipeline.report.audit_page import Thumbnails
    secret = tmp_path / "private"
    photo(secret / "me.jpg")
    images = images_for(tmp_path / "images")
    (images / "train" / "0.png").unlink()
    (images / "train" / "0.png").symlink_to(secret / "me.jpg")
    (images / "train" / "inside.png").symlink_to(images / "val" / "0.png")   # a link that stays inside
    (tmp_path / "report").mkdir()
    thumbs = Thumbnails(str(images), tmp_path / "report" / "thumbs")
    assert "a link out of the data folder" in thumbs.cell("train/0.png")
    assert "<img" in thumbs.cell("train/inside.png") and "<img" in thumbs.cell("train/1.png")
    assert len(list((tmp_path / "report" / "thumbs").iterdir())) == 2


# --- the printer: one line, escaped -------------------------------------------------------------------

def test_names_are_shown_escaped_and_on_one_line():
    assert shown("cat\x1b[2J\nrm -rf\r\t\x7f") == "cat\\x1b[2J\\nrm -rf\\r\\t\\x7f"
    assert shown(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"          # a name that is not UTF-8
    assert shown("\u202egnp.exe") == "\\u202egnp.exe" and shown("ümlaut 猫") == "ümlaut 猫"
    assert shown("x" * 500, 20) == "x" * 17 + "..."


def test_a_name_that_is_not_utf8_reaches_a_strict_terminal(monkeypatch):
    terminal = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stderr", terminal)
    name = os.fsdecode(b"bad-\xff-name.png")
    say(f"skipped {name}: \x1b]0;owned\x07")
    terminal.flush()
    assert terminal.buffer.getvalue() == b"skipped bad-\\xff-name.png: \\x1b]0;owned\\x07\n"


@pytest.mark.parametrize("classes", [(os.fsdecode(b"r\xe9d"), "blue"), ("\x1b[2Jred", "blue\nerror: forged")])
def test_hostile_class_names_reach_the_audit_log_escaped(tmp_path, classes):
    cache = small_audit_cache(tmp_path / "features.h5", classes=classes)
    proc = cli_in_process("audit", cache, "--out", tmp_path / "report", *FAST)
    assert proc.returncode == 0 and "\x1b" not in proc.stderr and "Traceback" not in proc.stderr
    assert not any(line.startswith("error:") for line in proc.stderr.splitlines())


def test_library_warnings_are_one_line_each_kind(capsys):
    def noisy():
        for i in range(3):
            warnings.warn_explicit(f"lbfgs failed to converge (iteration {i})", RuntimeWarning, "lib.py", i)
        warnings.warn_explicit("Constant folding not applied", UserWarning, "torch.py", 1)
    errors.run_stage(noisy)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["warning: RuntimeWarning (x3): lbfgs failed to converge (iteration 0)",
                     "warning: UserWarning: Constant folding not applied"]


def test_an_unterminated_quote_in_an_exclude_list_is_one_line(tmp_path):
    images = make_image_folder(tmp_path / "images", {"train": 2, "val": 1, "test": 1})
    exclude = tmp_path / "exclude.csv"
    exclude.write_text('path\n"train/red/a.png\n' + "".join(f"row{i}.png\n" for i in range(1000)))
    line = one_line_error(cli_in_process("extract", images, "--out", tmp_path / "f.h5", "--exclude", exclude))
    assert "unexpected end of data" in line and not (tmp_path / "f.h5").exists()


def test_an_error_line_cannot_forge_a_second_line(tmp_path):
    line = one_line_error(cli_in_process("audit", tmp_path / "no\nerror: forged.h5"))
    assert "\\n" in line


# --- nothing bypasses the writer, the reader and the printer ----------------------------------------------

ALLOWED = {"runtime/files.py", "runtime/printing.py", "runtime/reading.py"}
BYPASS = re.compile(r"""open\([^)]*["']w|\.write_text\(|\.write_bytes\(|json\.loads?\(|\bprint\(""")


def test_no_command_writes_reads_or_prints_around_them():
    """Each remaining place says why on its line (a comment) or is one of the writer's own modules."""
    found = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = str(path.relative_to(ROOT / "pipeline"))
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if BYPASS.search(line.split("#")[0]) and rel not in ALLOWED and "#" not in line:
                found.append(f"{rel}:{number}: {line.strip()}")
    assert found == []


# --- the reader and the bounds ---------------------------------------------------------------------------

def edited_cache(tmp_path: Path, **attrs) -> Path:
    """A real cache whose root attributes were edited, its checksum recomputed as a careful forger would."""
    import h5py

    from pipeline.storage.cache import attrs_checksum
    path = small_audit_cache(tmp_path / "features.h5")
    with h5py.File(path, "r+") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["checksum"] = attrs_checksum(f.attrs)
    return path


@pytest.mark.parametrize("attrs, message", [
    ({"transform": "not json"}, "attribute transform is not valid JSON"),
    ({"transform": json.dumps({"image_size": 32, "resize": 32, "interpolation": "nearest", "mean": [0, 0, 0],
                               "std": [1, 1, 1]})}, "'interpolation' must be one of bilinear, bicubic"),
    ({"transform": json.dumps({"image_size": "224", "resize": 32, "interpolation": "bilinear",
                               "mean": [0, 0, 0], "std": [1, 1, 1]})}, "'image_size' must be int, got str"),
    ({"transform": json.dumps({"image_size": 32, "resize": 32, "interpolation": "bilinear", "mean": [0, 0],
                               "std": [0, 1, 1]})}, "'mean' must list 3 values, got 2"),
    ({"digests": "[1, 2]"}, "attribute digests must be dict, got list"),
    ({"digests": json.dumps({"train/labels": 7})}, "entry 'train/labels' must be str, got int"),
    ({"classes": json.dumps([f"c{i}" for i in range(10 ** 6)])}, "lists 1,000,000 classes but holds 32 images"),
])
def test_a_cache_with_edited_attributes_is_one_line(tmp_path, attrs, message):
    from pipeline.storage.cache import fingerprint
    cache = edited_cache(tmp_path, **attrs)
    import h5py
    with h5py.File(cache, "r+") as f:   # and the fingerprint, so only the edited value can be refused
        from pipeline.storage.cache import attrs_checksum
        f.attrs["fingerprint"] = fingerprint({k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()})
        f.attrs["checksum"] = attrs_checksum(f.attrs)
    for command in ("audit", "train"):
        line = one_line_error(cli_in_process(command, cache, "--out", tmp_path / command))
        assert message in line and not (tmp_path / command).exists()


def test_a_cold_start_cache_counts_its_pool_against_its_classes(tmp_path):
    """A cache of a pool alone names classes it has no labelled image of yet; more names than images is damage."""
    import h5py

    from pipeline.storage.cache import attrs_checksum, fingerprint, open_cache
    from tests.test_select import pooled_cache
    cache, _ = pooled_cache(tmp_path / "f.h5", labelled=0, pool=12, classes=3)
    with open_cache(cache) as opened:
        assert opened.classes == ["c0", "c1", "c2"] and opened.splits == []
    with h5py.File(cache, "r+") as f:
        f.attrs["classes"] = json.dumps([f"c{i}" for i in range(13)])
        f.attrs["fingerprint"] = fingerprint({k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()})
        f.attrs["checksum"] = attrs_checksum(f.attrs)
    with pytest.raises(pipeline.InputError, match="lists 13 classes but holds 12 images"):
        open_cache(cache)


@pytest.mark.parametrize("args, message", [
    (("--neighbours", 100000000), "--neighbours must be at most 1,000, got 100000000"),
    (("--neighbours", 32), "--neighbours must be below the number of images (32), got 32"),
    (("--seeds", 1000000), "--seeds must be at most 100, got 1000000"),
    (("--folds", 1000), "--folds must be at most 100, got 1000"),
])
def test_audit_settings_have_bounds_from_the_data(tmp_path, args, message):
    cache = small_audit_cache(tmp_path / "features.h5")
    assert one_line_error(cli_in_process("audit", cache, "--out", tmp_path / "r", *args)) == f"error: {message}"


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_cached_onnx_record_that_is_not_a_regular_file_is_not_read(tmp_path, kind):
    from pipeline.features.engines.onnx_runtime import ExportCache
    cache = ExportCache(tmp_path)
    key = {"backbone": "tiny", "v": 1}
    graph, record = cache.paths(key)
    graph.write_bytes(b"graph")
    if kind == "fifo":
        os.mkfifo(record)
    else:
        record.symlink_to("/dev/zero")
    model, reference, why = cache.load(key)   # returns at once: no hang, no MemoryError
    assert model is None and "not a regular file" in why


def damaged_weights(kind: str, good: bytes) -> bytes:
    header = int.from_bytes(good[:8], "little")
    return {
        "empty": b"",
        "truncated": good[:len(good) // 2],
        "random bytes": np.random.default_rng(0).bytes(4096),
        "a huge header length": (2 ** 62).to_bytes(8, "little") + good[8:],
        "a header that is not JSON": header.to_bytes(8, "little") + b"{" * header + good[8 + header:],
        "a pickle": __import__("pickle").dumps({"weight": [1.0] * 100}),
        "offsets past the end": good[:8] + good[8:8 + header].replace(b"]}", b"0]}", 1) + good[8 + header:],
    }[kind]


@pytest.mark.parametrize("kind", ["empty", "truncated", "random bytes", "a huge header length",
                                  "a header that is not JSON", "a pickle", "offsets past the end"])
def test_a_damaged_hub_weights_file_is_one_line(tmp_path, monkeypatch, kind):
    from huggingface_hub import constants

    from pipeline.features.backbones.loading import build_backbone
    from tests.test_hub import MODEL, hub_cache
    weights = hub_cache(tmp_path / "hf", seed=0)
    weights.write_bytes(damaged_weights(kind, weights.read_bytes()))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(pipeline.InputError, match=f"weights file {re.escape(str(weights))}") as caught:
        build_backbone(f"timm/{MODEL}", "pretrained")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("change, message", [
    ({"interpolation": "nearest"}, "'interpolation' must be one of bilinear, bicubic, got 'nearest'"),
    ({"mean": [0.5, 0.5]}, "'mean' must list 3 values, got 2"),
    ({"std": [0, 1, 1]}, "'std' item 0 is out of range, got 0"),
    ({"image_size": "224"}, "'image_size' must be int, got str"),
    ({"resize": -1}, "'resize' is out of range, got -1"),
])
def test_an_edited_model_json_is_one_line(tmp_path, change, message):
    from pipeline.storage.modeldir import read_info
    model = tmp_path / "model"
    model.mkdir()
    preprocessing = {"image_size": 32, "resize": 36, "interpolation": "bilinear", "mean": [0.5] * 3,
                     "std": [0.25] * 3}
    info = {"kind": "features", "classes": ["a", "b"], "fingerprint": "f" * 64, "files": {},
            "backbone": {"backbone": "efficientnet_lite0", "weights": "imagenet", "weights_sha256": "0" * 64,
                         "layer": "pool", "preprocessing": {**preprocessing, **change}}}
    (model / "model.json").write_text(json.dumps(info))
    line = one_line_error(cli_in_process("predict", model, tmp_path))
    assert line == f"error: {model / 'model.json'}: backbone.preprocessing: {message}"
    with pytest.raises(pipeline.InputError):
        read_info(model)


@pytest.fixture(scope="module")
def trained(small_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "model"
    assert cli_in_process("train", small_cache, "--out", out, "--param", "C=1", "--quiet").returncode == 0
    return out


def edited_model(trained: Path, tmp_path: Path, edit) -> Path:
    import shutil
    model = tmp_path / "model"
    shutil.copytree(trained, model)
    info = json.loads((model / "model.json").read_text())
    edit(info)
    (model / "model.json").write_text(json.dumps(info))
    return model


def photo_folder(tmp_path: Path) -> Path:
    photo(tmp_path / "photos" / "a.jpg")
    return tmp_path / "photos"


@pytest.mark.parametrize("edit, message", [
    (lambda info: info["backbone"].update(backbone="mobilenet_v3_large", weights_sha256="1" * 64),
     "the backbone mobilenet_v3_large (weights SHA-256 111111111111) is not the one the head was trained on"),
    (lambda info: info["backbone"].update(tta=True), "is not the one the head was trained on"),
    (lambda info: info["cache"].update(backbone="mobilenet_v3_large"), "'cache' does not give the recorded fingerprint"),
    (lambda info: info.pop("cache"), "does not record the feature cache its head was trained on"),
])
def test_predict_refuses_a_backbone_other_than_the_one_trained_on(trained, tmp_path, edit, message):
    model = edited_model(trained, tmp_path, edit)
    assert message in one_line_error(cli_in_process("predict", model, photo_folder(tmp_path)))


def test_predict_with_the_backbone_trained_on_runs(trained, tmp_path):
    proc = cli_in_process("predict", trained, photo_folder(tmp_path), "--engine", "torch")
    assert proc.returncode == 0 and "a.jpg" in proc.stdout


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_params_yaml_that_is_not_a_small_regular_file_is_one_line(tmp_path, kind):
    from pipeline.auditing.settings import AuditSettings
    from pipeline.config import stage_settings
    params = tmp_path / "params.yaml"
    if kind == "fifo":
        os.mkfifo(params)
    elif kind == "dev-zero":
        params.symlink_to("/dev/zero")
    else:
        params.write_text("audit:\n  folds: 3\n" + "#" * (2 << 20))
    with pytest.raises(pipeline.InputError, match=f"cannot read {re.escape(str(params))}: "):
        stage_settings(AuditSettings, "audit", path=params)


def test_export_prints_torch_warnings_as_one_line_and_a_link_at_its_output_is_replaced(trained, tmp_path):
    victim = tmp_path / "victim.onnx"
    victim.write_bytes(b"precious")
    out = tmp_path / "model.onnx"
    out.symlink_to(victim)
    (tmp_path / "model.tmp.onnx").symlink_to(victim)   # the temporary name earlier versions used
    proc = cli_in_process("export", trained, "--out", out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("exported ") and all(line.startswith("warning: ") for line in lines[1:])
    assert len({line.split(":")[1] for line in lines[1:]}) == len(lines[1:])   # one line per kind
    assert victim.read_bytes() == b"precious" and not out.is_symlink() and out.stat().st_size > 1000


def test_compare_shows_a_model_name_that_is_not_utf8_escaped(trained, tmp_path):
    import shutil
    model = tmp_path / os.fsdecode(b"m\xe9\x1b[2J")
    shutil.copytree(trained, model)
    victim = tmp_path / "victim.md"
    victim.write_text("precious\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "compare.md").symlink_to(victim)
    proc = cli_in_process("compare", model, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "\\xe9\\x1b[2J" in proc.stdout and "\x1b" not in proc.stdout
    assert victim.read_text() == "precious\n" and (tmp_path / "out" / "compare.md").is_file()


@pytest.mark.parametrize("planted", ["link", "photo"])
def test_visualize_never_replaces_a_folder_holding_what_it_did_not_write(trained, tmp_path, planted):
    out = tmp_path / "visual"
    out.mkdir()
    victim = tmp_path / "victim.png"
    kept = photo(victim if planted == "link" else out / "holiday.jpg")
    if planted == "link":
        (out / "predictions.png").symlink_to(victim)
    line = one_line_error(cli_in_process("visualize", trained, photo_folder(tmp_path), "--out", out))
    assert "did not write" in line
    assert (victim if planted == "link" else out / "holiday.jpg").read_bytes() == kept
