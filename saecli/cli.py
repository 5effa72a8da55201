"""The `saecli` command line: a Typer app whose commands live in `saecli/commands/` (one file each).

This is the only place that turns exceptions into messages and exit codes:
usage/config errors → 2, runtime failures → 1, Ctrl-C → 130; a traceback only with `--verbose`.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Optional

import typer

try:  # typer >= 0.25 vendors click
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exc  # type: ignore[no-redef]

from saecli import __version__, ui
from saecli.errors import SaecliError, SaecliWarning

# Commands that work, in the order `--help` lists them. A module registers itself with `register(app)`.
COMMAND_MODULES: list[str] = [
    "generate",
    "check",
    "hooks",
    "train",
    "eval",
    "analyze",
    "dla",
    "sweep",
    "autointerp",
    "record",
    "export",
    "cache",
]  # each helper module appends its name when the command works
# Commands that take no experiment file: writing one (init, schema) and browsing the store (runs).
TOOL_MODULES: list[str] = ["init", "schema", "runs"]

app = typer.Typer(
    name="saecli",
    help="Train and study sparse dictionaries on language-model activations.\n\n"
    "Every command takes a TOML experiment file (or a run folder holding config.toml); "
    "`--set section.key=value` overrides any key. Example:\n\n"
    "    saecli generate experiments/tiny/generate.toml --set activations.total_tokens=20000\n\n"
    "Paths: relative paths in a TOML file (model, cache, store, output folder) are taken from the current "
    "directory; a run's config.toml holds them absolute, and a run folder given to a command is the run "
    "(it reads and writes that folder only), so it works from anywhere, also when copied.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"saecli {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More logging; tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and final results."),
) -> None:
    ui.set_verbosity(verbose=verbose, quiet=quiet)


for _name in COMMAND_MODULES + TOOL_MODULES:
    importlib.import_module(f"saecli.commands.{_name}").register(app)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """saecli's own warnings (a skipped cache chunk, ...) print like every other saecli warning."""
    if issubclass(category, SaecliWarning):
        ui.warn(str(message))
    else:
        _default(message, category, filename, lineno, file, line)


GLOBAL_FLAGS = ("-v", "--verbose", "-q", "--quiet")


def hoist_global_flags(args: list[str]) -> list[str]:
    """Move -v/-q (and their long forms) to the front, so `saecli train exp.toml -q` works as
    `saecli -q train exp.toml` does; nothing after a `--` is touched."""
    cut = args.index("--") if "--" in args else len(args)
    head = args[:cut]
    return [a for a in head if a in GLOBAL_FLAGS] + [a for a in head if a not in GLOBAL_FLAGS] + args[cut:]


def main(argv: list[str] | None = None) -> None:
    args = hoist_global_flags(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _show_warning
    verbose = any(a in ("-v", "--verbose") for a in args)
    try:
        # not standalone, typer returns (not raises) an exit code: typer.Exit(n), or 130 for Ctrl-C
        code = app(args=args, prog_name="saecli", standalone_mode=False)
        if "torch.distributed" in sys.modules:  # one of several ranks: leave together, cleanly
            from saecli.training.distributed import shutdown

            shutdown(graceful=True)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        ui.error("aborted")
        sys.exit(130)
    except _click_exc.ClickException as exc:
        exc.show()
        sys.exit(2)
    except SaecliError as exc:
        if verbose:
            ui.traceback()
        ui.error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        ui.error("interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug or an unexpected failure: one paragraph, traceback on -v
        if verbose:
            ui.traceback()
        ui.error(f"{type(exc).__name__}: {exc}" + ("" if verbose else "\n(run with --verbose for the traceback)"))
        sys.exit(1)
    if code == 130:
        ui.error("interrupted")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
