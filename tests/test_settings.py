"""One settings object per stage: the command line's options, params.yaml, --help and docs/dvc.md's params
list all follow its fields; a bad invocation or a bad params.yaml is one `error:` line, exit code 2."""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.auditing.settings import AuditSettings
from pipeline.features.settings import BenchSettings, ExtractSettings
from pipeline.tuning.settings import FinetuneSettings
from pipeline.heads.settings import CLASSIFIERS, TrainSettings, train_settings
from pipeline.runtime.errors import InputError, quote
from pipeline.runtime.settings import fields, option_name, rule
from pipeline.selection.settings import SelectSettings
from tests.conftest import COLOURS, ROOT, cli_in_process, stage_in_process, tiny_image

COMMANDS = {"extract": ExtractSettings, "train": TrainSettings, "finetune": FinetuneSettings, "bench": BenchSettings,
            "audit": AuditSettings, "select": SelectSettings}
SECTIONS = {"extract": ExtractSettings, "finetune.<run>": FinetuneSettings, "audit": AuditSettings,
            "select": SelectSettings}


def squeezed(text: str) -> str:
    """Text without whitespace: help wraps its lines anywhere, hyphens included."""
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_setting_with_its_doc_and_flags_as_flags(command):
    text = cli_in_process(command, "--help", check=True).stdout
    for f in fields(COMMANDS[command]):
        r = rule(f)
        assert r.option and option_name(f.name) in text and squeezed(r.doc) in squeezed(text), f.name
        if isinstance(f.default, bool) and not f.default:
            assert re.search(rf"{option_name(f.name)}\s+[A-Z]", text), f"{f.name} is not shown as a flag"
    assert "<bool>" not in text and "{" not in text.splitlines()[0]
    assert re.match(rf"Usage: .* {command} \[OPTIONS\] (DATA|FEATURES)$", text.splitlines()[0])
    if command == "train":   # the classifiers of the registry, not a hand-written list
        assert f"<{'|'.join(CLASSIFIERS)}>" in text


def documented_settings(section: str) -> list[str]:
    """The names docs/dvc.md's params.yaml list gives for `section`, up to the first parenthesis."""
    page = (ROOT / "docs" / "dvc.md").read_text()
    match = re.search(rf"^- `{re.escape(section)}`: (.*?)\(", page, re.M | re.S)
    assert match, f"docs/dvc.md's params list has no line for {section}"
    return re.findall(r"`(\w+)`", match.group(1))


@pytest.mark.parametrize("section", SECTIONS)
def test_documented_params_list_names_every_setting(section):
    assert documented_settings(section) == [f.name for f in fields(SECTIONS[section])]


def test_documented_classifier_table_matches_the_registry():
    page = (ROOT / "docs" / "classifiers.md").read_text()
    common = [f.name for f in fields(TrainSettings) if f.name != "classifier"]
    assert documented_settings("train.<classifier>") == common
    for name, spec in CLASSIFIERS.items():
        row = re.search(rf"^\| `{name}` \|(.*)$", page, re.M)
        assert row, f"docs/classifiers.md's classifier table has no row for {name}"
        tuned, own, probabilities, export = re.split(r"(?<!\\)\|", row.group(1))[1:5]   # cells, not \| in them
        assert re.findall(r"`(\w+)`", tuned) == [spec.tuned], name
        listed = re.findall(r"`(\w+)`", own.split("(")[0])
        assert listed == [p for p in spec.params if p not in common], name
        assert (probabilities.strip() == "✓", export.strip() == "✓") == (spec.probabilities, bool(spec.to_torch)), name


@pytest.mark.parametrize("args, words", [
    ((), "Missing command"),
    (("nope",), "No such command 'nope'"),
    (("extract",), "Missing argument 'DATA'"),
    (("extract", "x", "--bogus"), "No such option: --bogus"),
    (("extract", "x", "--tta", "true"), "unexpected extra argument(s) (true)"),
    (("extract", "x", "--device", "gpu"), "'gpu' is not one of 'auto', 'cpu', 'cuda'"),
    (("extract", "x", "--batch-size", "many"), "Invalid value for '--batch-size'"),
    (("train", "f.h5", "--classifier", "forest"), "'forest' is not one of"),
    (("train", "f.h5", "--classifier", "knn", "--param", "gamma=2"),
     "--param gamma is not a setting of knn; allowed: n_neighbors"),
])
def test_every_bad_invocation_is_one_error_line(tmp_path, args, words):
    proc = cli_in_process(*args, cwd=tmp_path)
    assert proc.returncode == 2 and not proc.stdout, proc
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert words in proc.stderr and not re.search("[╭│╰]", proc.stderr)
    assert not list(tmp_path.iterdir())


def test_allowed_keys_are_listed_once():
    for name, raw in (("rbf_svm", {"gama": 2}), ("logreg", {"gamma": 2}), ("torch_mlp", {"hiden": 2})):
        with pytest.raises(InputError) as caught:
            train_settings(name, raw)
        allowed = str(caught.value).split("allowed: ")[1].split(", ")
        assert len(allowed) == len(set(allowed)) and allowed.count("seed") == 1, caught.value


def alias_bomb(levels: int = 9) -> str:
    """A small YAML file whose `extract.layer` expands to 9**levels strings (the billion laughs)."""
    lines = ["bomb:", '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefghij", "bcdefghijk"[:levels - 1]):
        lines.append(f"  {name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + f"\nextract:\n  layer: *{'abcdefghij'[levels - 1]}\nextractors:\n  x: {{}}\n"


def run_stage(stage: str, cwd: Path, *args, memory: int | None = None) -> subprocess.CompletedProcess:
    """stages/<stage> for real in `cwd`, optionally with its address space limited to `memory` bytes."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (memory, memory))) if memory else None
    return subprocess.run([sys.executable, str(ROOT / "stages" / stage), *map(str, args)], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)


def test_a_yaml_alias_bomb_is_quoted_by_its_start_only(tmp_path):
    bomb = alias_bomb()
    assert len(bomb.encode()) < 500
    start = time.perf_counter()
    assert len(quote(yaml.safe_load(bomb)["extract"]["layer"])) <= 80 and time.perf_counter() - start < 1
    (tmp_path / "params.yaml").write_text(bomb)
    proc = run_stage("extract.py", tmp_path, "x", tmp_path / "images", tmp_path / "f.h5", memory=1 << 30)
    assert proc.returncode == 2 and len(proc.stderr) < 300, proc.stderr[:1000]
    assert proc.stderr.startswith("error: params.yaml: extract.layer must be a list of strings or null, got [[[")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("stage, params, words", [
    ("train.py", 'torch_mlp: {epochs: "10"}', "train.torch_mlp.epochs must be an integer, got '10'"),
    ("train.py", "torch_mlp: {epochs: 10.5}", "train.torch_mlp.epochs must be an integer, got 10.5"),
    ("train.py", "torch_mlp: {hidden: [1, 2]}", "train.torch_mlp.hidden must be an integer, got [1, 2]"),
    ("train.py", "torch_mlp: {weight_decay: .nan}", "train.torch_mlp.weight_decay must be a finite number, got nan"),
    ("train.py", "torch_mlp: {batch_size: 1.0e+20}", "train.torch_mlp.batch_size must be an integer, got 1e+20"),
    ("train.py", "torch_mlp: {batch_size: 100000000000000000000}",
     "train.torch_mlp.batch_size must be at most 10,000,000, got 100000000000000000000"),
    ("finetune.py", "torch_mlp: {epochs: 10.5}", "finetune.torch_mlp.epochs must be an integer, got 10.5"),
    ("extract.py", "{batch_size: .inf}", "extract.batch_size must be an integer or null, got inf"),
])
def test_bad_params_values_are_one_line_naming_the_key(tmp_path, stage, params, words):
    section = {"train.py": "train", "finetune.py": "finetune", "extract.py": "extract"}[stage]
    (tmp_path / "params.yaml").write_text(f"{section}:\n  {params}\nextractors:\n  x: {{}}\n")
    args = {"train.py": ("torch_mlp", tmp_path / "f.h5", tmp_path / "m"),
            "finetune.py": ("torch_mlp", tmp_path / "images", tmp_path / "m"),
            "extract.py": ("x", tmp_path / "images", tmp_path / "f.h5")}[stage]
    proc = stage_in_process(stage, tmp_path, *args)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [f"error: params.yaml: {words}"], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_params_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_bytes("extract:\n  labels: caf\u00e9.csv\n".encode("latin-1"))
    proc = stage_in_process("extract.py", tmp_path, "x", tmp_path / "images", tmp_path / "f.h5")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: params.yaml is not UTF-8 text (byte 22: b'\\xe9')"], proc.stderr


def labelled_folder(root: Path, per_class: int = 6) -> Path:
    """DATA/img_N.png, classes only in DATA/labels.csv (column `colour`)."""
    root.mkdir()
    rows = ["name,colour"]
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(per_class):
            tiny_image(colour, seed=100 * c + i).save(root / f"img_{c}{i}.png")
            rows.append(f"img_{c}{i},{name}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_finetune_and_bench_take_a_labels_file(tmp_path):
    data = labelled_folder(tmp_path / "data")
    labels = ("--labels", data / "labels.csv", "--id-column", "name", "--label-column", "colour")
    cli_in_process("finetune", data, *labels, "--out", tmp_path / "ft", "--strategy", "head", "--epochs", 1,
            "--image-size", 32, "--batch-size", 6, "--workers", 0, "--device", "cpu", "--val-fraction", 0.2,
            "--quiet", check=True)
    info = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert info["classes"] == sorted(COLOURS)
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    details = json.loads((tmp_path / "ft" / "details.json").read_text())
    assert metrics["n_eval"] > 0 and details["hyperparameters"]["labels"] == str(data / "labels.csv")
    proc = cli_in_process("bench", data, *labels, "--out", tmp_path / "bench.json", "--image-size", 32, "--batch-size", 4,
                   "--repeats", 1, "--no-tutorial", "--images", 8, "--workers", 0, "--device", "cpu", check=True)
    rows = json.loads((tmp_path / "bench.json").read_text())     # one row per engine
    assert rows and all(row["images"] == 8 for row in rows), proc.stderr
    wrong = cli_in_process("bench", data, "--labels", data / "labels.csv", "--repeats", 1)   # no column 'breed'/'label'
    assert wrong.returncode == 2 and "labels.csv" in wrong.stderr and len(wrong.stderr.splitlines()) == 1


def interrupt_once_torch_loads(command: list) -> subprocess.CompletedProcess:
    """Run `pipeline COMMAND` and press Ctrl-C once torch is loaded, i.e. inside the command itself."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, command)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps = Path(f"/proc/{proc.pid}/maps")
    try:
        while proc.poll() is None and "libtorch" not in maps.read_text():
            time.sleep(0.02)
    except FileNotFoundError:
        pass
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, None, stderr)


def test_ctrl_c_in_train_and_predict_says_what_stopped(small_cache, tmp_path):
    from pipeline.heads.train import train
    stopped = interrupt_once_torch_loads(["train", small_cache, "--classifier", "torch_mlp", "--param",
                                          "epochs=1000000", "--out", tmp_path / "m"])
    assert stopped.returncode == 130 and stopped.stderr.startswith("interrupted: "), stopped.stderr
    assert len(stopped.stderr.splitlines()) == 1 and "train" in stopped.stderr
    assert not (tmp_path / "m").exists()
    train(small_cache, tmp_path / "model", train_settings("logreg", {"C": 10}))
    stopped = interrupt_once_torch_loads(["predict", tmp_path / "model", small_cache.parent / "images"])
    assert stopped.returncode == 130 and stopped.stderr.splitlines() == ["interrupted: pipeline predict stopped"]
