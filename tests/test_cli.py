"""The command line as a user meets it: --version, --help with examples, exit codes, no tracebacks."""

from __future__ import annotations

import pytest
from conftest import write_toml

from saecli import __version__
from saecli.cli import COMMAND_MODULES, TOOL_MODULES


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and __version__ in result.stdout


def test_help_lists_every_registered_command(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for name in COMMAND_MODULES + TOOL_MODULES:
        assert name in result.stdout


@pytest.mark.parametrize("command", COMMAND_MODULES)
def test_every_command_has_help_with_an_example(run_cli, command):
    result = run_cli(command, "--help")
    assert result.exit_code == 0, result.output
    assert "saecli " + command in result.stdout  # the docstring's example line
    assert "--set" in result.stdout or command in ("check", "export", "cache")  # these read no experiment


def test_unknown_command_is_exit_2(cli):
    result = cli("trian", "x.toml")
    assert result.exit_code == 2


@pytest.mark.parametrize("command", [c for c in COMMAND_MODULES if c not in ("check", "export", "cache")])
def test_missing_experiment_file_is_exit_2_without_traceback(run_cli, command, tmp_path):
    result = run_cli(command, str(tmp_path / "missing.toml"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "not found" in result.output


@pytest.mark.parametrize("command", [c for c in COMMAND_MODULES if c not in ("check", "export", "cache")])
def test_config_errors_are_exit_2_and_name_the_key(run_cli, command, tmp_path):
    exp = write_toml(tmp_path / "exp.toml", '[model]\nname = "x"\n[trainer]\nlr_sheduler = "constant"\n')
    result = run_cli(command, str(exp))
    assert result.exit_code == 2, result.output
    assert "lr_sheduler" in result.output and "lr_scheduler" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [c for c in COMMAND_MODULES if c not in ("check", "export", "cache")])
def test_toml_syntax_error_is_exit_2_with_line(run_cli, command, tmp_path):
    exp = write_toml(tmp_path / "exp.toml", "[model\nname = 1\n")
    result = run_cli(command, str(exp))
    assert result.exit_code == 2
    assert "line 1" in result.output


@pytest.mark.parametrize("command", [c for c in COMMAND_MODULES if c not in ("check", "export", "cache")])
def test_bad_override_is_exit_2(run_cli, command, tmp_path):
    exp = write_toml(tmp_path / "exp.toml", '[model]\nname = "x"\n')
    result = run_cli(command, str(exp), "--set", "trainer.lr=fast")
    assert result.exit_code == 2
    assert "trainer.lr" in result.output


def test_shipped_completions_are_current():
    from conftest import REPO

    from saecli.commands import completion_scripts

    for path, script in completion_scripts().items():  # what scripts/make_completions.sh writes
        assert (REPO / path).read_text() == script, f"{path} is stale: run scripts/make_completions.sh"


@pytest.mark.parametrize("command", TOOL_MODULES)
def test_commands_without_an_experiment_have_help_with_an_example(run_cli, command):
    result = run_cli(command, "--help")
    assert result.exit_code == 0, result.output
    assert "saecli " + command in result.stdout


def test_completion_callback_completes_commands():
    import os
    import subprocess
    import sys

    env = dict(os.environ, _SAECLI_COMPLETE="complete_bash", COMP_WORDS="saecli tr", COMP_CWORD="1")
    proc = subprocess.run([sys.executable, "-m", "saecli"], env=env, capture_output=True, text=True, timeout=120)
    assert "train" in proc.stdout
