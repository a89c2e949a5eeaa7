"""`pipeline --help` and every subcommand's --help document every option."""
import typer

from pipeline.cli import app
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
