"""`pipeline --help` and every subcommand's --help document every option."""
import os

import pytest
import typer

from pipeline.cli import app
from tests import conftest
from tests.conftest import run_cli


def test_every_parameter_has_help():
    group = typer.main.get_command(app)
    assert set(group.commands) >= {"extract", "train", "predict", "compare"}
    for name, command in group.commands.items():
        assert command.help, name
        for param in command.params:
            if param.name != "help":
                assert getattr(param, "help", None), f"{name} {param.name} has no help"


def test_help_runs_as_a_module_and_lists_options():
    proc = run_cli("--help", check=True)
    assert "extract" in proc.stdout and "train" in proc.stdout
    proc = run_cli("extract", "--help", check=True)
    for option in ("--out", "--backbone", "--weights", "--layer", "--image-size", "--batch-size", "--device",
                   "--dtype", "--quiet"):
        assert option in proc.stdout


@pytest.mark.skipif(os.environ.get("FRESH_CLI") == "1", reason="FRESH_CLI=1 runs each command in a fresh interpreter")
def test_commands_of_test_modules_run_in_the_warm_interpreter():
    """tests/ is a package, so test modules import the conftest pytest loaded: as a second copy (tests/ on
    the path as well), it had no warm interpreter, and each command started a fresh one."""
    warm = conftest._warm[0]
    before = warm.commands
    run_cli("--help", check=True)
    assert warm.commands == before + 1
