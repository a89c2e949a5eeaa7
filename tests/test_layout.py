"""The code's structure: each DVC stage depends on every module its script may import (so editing one
reruns the stage), the subpackages depend on each other one way only (README, Architecture), and every
command imports its modules the same way (pipeline.runtime.imports)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

# lowest first: a subpackage may import its own layer and those before it; cli and config sit on top
LAYERS = ("runtime", "data", "storage", "features", "heads", "tuning", "models", "auditing", "selection", "report")


def imported_names(path: Path) -> set[str]:
    """The pipeline names a file imports anywhere in it, imports inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in names if name.split(".")[0] == "pipeline"}


def module_file(name: str) -> Path | None:
    """The file of module `name`, or None when the name is not a module (a function imported from one)."""
    base = ROOT.joinpath(*name.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def import_closure(script: Path) -> set[Path]:
    """Every file of the package that running `script` may execute, the packages' __init__ files included."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in imported_names(todo.pop()):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                found = module_file(".".join(parts[:i]))
                if found and found not in seen:
                    seen.add(found)
                    todo.append(found)
    return seen


def stage_scripts() -> list[tuple[str, Path, list[str]]]:
    """(stage, script, deps) of each stage of dvc.yaml that runs a script of stages/."""
    out = []
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        stage = stage.get("do", stage)
        script = next(word for word in stage["cmd"].split() if word.startswith("stages/"))
        out.append((name, ROOT / script, [str(dep) for dep in stage["deps"]]))
    return out


@pytest.mark.parametrize("stage, script, deps", stage_scripts(), ids=lambda v: v if isinstance(v, str) else "")
def test_dvc_deps_cover_each_stage_script_and_its_imports(stage, script, deps):
    needed = {script, *import_closure(script)}
    covered = [ROOT / dep for dep in deps]
    missing = sorted(str(f.relative_to(ROOT)) for f in needed
                     if not any(f == dep or dep in f.parents for dep in covered))
    assert not missing, f"dvc.yaml stage {stage} runs {script.name}, which imports files its deps miss: {missing}"


def test_import_closure_follows_imports_inside_functions():
    closure = import_closure(ROOT / "stages" / "train.py")
    assert ROOT / "pipeline" / "heads" / "train.py" in closure                 # imported inside main()
    assert ROOT / "pipeline" / "heads" / "classifiers" / "__init__.py" in closure           # through heads.train
    assert ROOT / "pipeline" / "__init__.py" in closure
    assert ROOT / "pipeline" / "features" / "extract.py" not in closure


def test_subpackages_import_only_their_own_layer_and_lower_ones():
    wrong = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        parts = path.relative_to(ROOT / "pipeline").parts
        if len(parts) == 1:
            continue   # cli, config, __init__, __main__: the top
        assert parts[0] in LAYERS, f"subpackage {parts[0]} has no place in LAYERS (README, Architecture)"
        for name in imported_names(path):
            target = (name.split(".") + [""])[1]
            if not target or not module_file(f"pipeline.{target}"):
                continue   # the package itself, or a name of its __init__ (__version__)
            if target not in LAYERS or LAYERS.index(target) > LAYERS.index(parts[0]):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, wrong


# Runs a command (`python -m pipeline ...` or a stage script) in this interpreter, after a script that
# watches it (below).
RUN_COMMAND = """
target, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(target, run_name="__main__", alter_sys=True) if target == "pipeline" else \\
    runpy.run_path(target, run_name="__main__")
"""

# Reports, as the command exits, whether the garbage collector is on and how many objects are frozen.
COLLECTOR_AT_EXIT = """
import atexit, gc, runpy, sys
atexit.register(lambda: print(gc.isenabled(), gc.get_freeze_count(), file=sys.stderr))
""" + RUN_COMMAND

# Reports, as the command exits, whether torch._dynamo had been imported when the command's last import
# window (`heavy_imports`) closed.
DYNAMO_IN_WINDOW = """
import atexit, contextlib, runpy, sys
import pipeline.runtime.imports as imports
window, seen = imports.heavy_imports, []
@contextlib.contextmanager
def watched():
    with window():
        yield
    seen.append("torch._dynamo" in sys.modules)
imports.heavy_imports = watched
atexit.register(lambda: print(seen, file=sys.stderr))
""" + RUN_COMMAND


def watched_train(watcher: str, command: tuple[str, ...], cache, out) -> str:
    """`pipeline train ...` or `stages/train.py NAME` on `cache` into `out` under `watcher`: its last stderr line."""
    target, *name = command
    args = [cache, "--out", out] if target == "pipeline" else [cache, out]
    proc = subprocess.run([sys.executable, "-c", watcher, target, *name, *map(str, args)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.json").is_file()
    return proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("command", [("pipeline", "train"), ("stages/train.py", "logreg")])
def test_commands_import_with_the_collector_off_and_freeze_what_they_imported(small_cache, tmp_path, command):
    """pipeline.runtime.imports: the seconds the collector would spend walking torch's and scikit-learn's
    objects (benchmarks/startup.py) are saved, and it is on again for the work."""
    enabled, frozen = watched_train(COLLECTOR_AT_EXIT, command, small_cache, tmp_path / "m").split()
    assert enabled == "True" and int(frozen) > 100_000     # scikit-learn alone leaves more than that


@pytest.mark.slow
@pytest.mark.parametrize("command", [("pipeline", "train", "--classifier", "torch_linear"),
                                     ("stages/train.py", "torch_linear")])
def test_a_torch_head_imports_what_its_optimizer_needs_in_the_import_window(small_cache, tmp_path, command):
    """Every torch optimizer imports torch._dynamo (2-3 s) as it is made: `train` imports it with the torch
    heads, in its import window, where the collector is off (RESULTS.md: 1-2 s less a command)."""
    assert watched_train(DYNAMO_IN_WINDOW, command, small_cache, tmp_path / "m") == "[True]"
