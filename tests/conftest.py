"""Shared fixtures: tiny random models built on the fly (once per session), and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Tiny matmuls: one torch thread avoids OpenMP hand-off costs on a shared 2-core machine.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folder of a tiny model per family: {'llama': path, 'gpt2': path, ...} (built lazily)."""
    from saecli.lm.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")

    class Lazy(dict):
        def __missing__(self, family):
            path = make_tiny_model(root / family, family)
            self[family] = path
            return path

    return Lazy()


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_models) -> Path:
    return tiny_models["gpt2"]


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.exit_code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.output = proc.stdout + proc.stderr

    def __repr__(self) -> str:
        return f"CliResult(exit_code={self.exit_code}, output={self.output[-2000:]!r})"


@pytest.fixture
def run_cli(capsys):
    """Run `saecli ...` in this process (fast; for exit codes and messages): → CliResult-like."""
    from saecli.cli import main

    def run(*args: str) -> CliResult:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(subprocess.CompletedProcess(args, code, captured.out, captured.err))

    return run


@pytest.fixture
def cli():
    """Run `python -m saecli ...` in a subprocess (real exit codes, real signals)."""

    def run(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> CliResult:
        full_env = dict(os.environ, COLUMNS="200", **(env or {}))
        proc = subprocess.run(
            [sys.executable, "-m", "saecli", *map(str, args)],
            cwd=cwd or REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )
        return CliResult(proc)

    return run


def write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def tiny_topk_toml(
    path: Path, model: Path, out: Path, *, name: str, activations: str, trainer: str, extra: str = ""
) -> Path:
    """An experiment training a TopK SAE (128 latents, k 8) on `blocks.1.hook_resid_post` of a tiny model,
    contexts of 64, no store. `activations` and `trainer` hold the rest of those tables (TOML lines),
    `extra` whole further tables."""
    head = textwrap.dedent(f'''
        [run]
        name = "{name}"
        output_dir = "{out}"
        [model]
        name = "{model}"
        device = "cpu"
        [sae]
        activation = "topk"
        d_sae = 128
        k = 8
        [store]
        backend = "none"
        [activations]
        hook_points = ["blocks.1.hook_resid_post"]
        context_size = 64
    ''')
    return write_toml(
        path,
        head
        + textwrap.dedent(activations).strip()
        + "\n[trainer]\n"
        + textwrap.dedent(trainer).strip()
        + "\n"
        + textwrap.dedent(extra),
    )
