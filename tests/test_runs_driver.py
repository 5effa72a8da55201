"""One run driver (saecli/runs/): `train` is a sweep of one member, so the two commands give the same
weights bit for bit, on a synthetic stream and on a live model; `train` hands back its summary; and
`training/` stays free of experiment files, the store and the terminal."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_topk_toml
from safetensors.torch import load_file

from saecli.config.base import parse
from saecli.config.load import load_experiment
from saecli.config.sweep import SweepConfig
from saecli.data.synthetic import SyntheticStream
from saecli.runs import RunResult, run_sweep, train
from saecli.sweep.grid import load_sweep, plan_from_dict
from saecli.training.checkpoint import list_checkpoints
from saecli.training.logger import read_metrics

REPO = Path(__file__).resolve().parents[1]
TIMING = ("tokens_per_s", "elapsed_s")
pytestmark = pytest.mark.usefixtures("one_thread")


def stream(exp=None) -> SyntheticStream:
    return SyntheticStream(d_model=16, n_atoms=32, k=3, batch_size=128)


def base(out: Path) -> dict:
    return {
        "run": {"output_dir": str(out), "name": "syn", "seed": 3},
        "sae": {"d_sae": 64, "k": 4, "activation": "topk"},
        "trainer": {
            "total_training_tokens": 128 * 30,
            "lr": 5e-3,
            "log_frequency": 10,
            "n_checkpoints": 2,
            "checkpoint_every_seconds": 0,
            "auxk_coefficient": 0.1,
            "dead_threshold_tokens": 256,
        },
        "store": {"backend": "none"},
    }


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "sae_weights.safetensors")), load_file(str(b / "sae_weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (k, float((wa[k] - wb[k]).abs().max()))


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def test_train_is_a_sweep_of_one_member_bit_for_bit(tmp_path):
    plan = plan_from_dict(base(tmp_path / "sweep"), parse(SweepConfig, {"grid": {"sae.k": [4]}}, key="sweep"))
    [row] = run_sweep(plan, stream_factory=stream)
    [member] = plan.members
    alone = dataclasses.replace(member.exp, run=dataclasses.replace(member.exp.run, output_dir=str(tmp_path / "a")))
    result = train(alone, stream=stream())
    assert isinstance(result, RunResult) and result.status == "finished" and row["status"] == "finished"
    assert_same_weights(result.folder, member.folder)
    assert [without_timing(r) for r in read_metrics(result.folder)] == [
        without_timing(r) for r in read_metrics(member.folder)
    ]
    assert (
        [s for s, _ in list_checkpoints(result.folder)] == [s for s, _ in list_checkpoints(member.folder)] == [15, 30]
    )
    # the summary comes back from the driver, equal to what it wrote
    assert result.summary == json.loads((result.folder / "summary.json").read_text())
    assert result.summary["step"] == 30 and result.summary["tokens"] == 128 * 30


def test_train_and_sweep_of_one_agree_on_a_live_model(tiny_llama, tmp_path):
    """The live path: `train` opens its own stream (and model), the sweep loads the model once and
    hands it to its stream; the weights are the same bits."""
    toml = tiny_topk_toml(
        tmp_path / "exp.toml",
        tiny_llama,
        tmp_path / "alone",
        name="live",
        activations="""
        model_batch_size = 4
        batch_size = 128
        shuffle_buffer_tokens = 512
    """,
        trainer="""
        total_training_tokens = 1280
        lr = 4e-3
        log_frequency = 5
        n_checkpoints = 1
        checkpoint_every_seconds = 0
    """,
        extra='[sweep]\ngrid = {"sae.k" = [8]}\n',
    )
    plan = load_sweep(toml, [f'run.output_dir="{tmp_path / "sweep"}"'])
    run_sweep(plan)
    text = toml.read_text()
    alone = tmp_path / "alone.toml"
    alone.write_text(text[: text.index("[sweep]")])
    result = train(load_experiment(alone))
    assert result.folder == tmp_path / "alone" and result.summary["step"] == 10
    assert_same_weights(result.folder, plan.members[0].folder)


FORBIDDEN = (
    "saecli.config.load",
    "saecli.store",
    "saecli.ui",
    "saecli.runs",
    "saecli.commands",
    "saecli.cli",
    "rich",
    "tomllib",
    "tomli",
    "tomli_w",
    "typer",
)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_training_knows_no_experiment_files_store_or_terminal():
    files = sorted((REPO / "saecli" / "training").glob("*.py"))
    assert len(files) > 5
    bad = {
        f.name: sorted(m for m in imported_modules(f) if any(m == x or m.startswith(x + ".") for x in FORBIDDEN))
        for f in files
    }
    assert not {k: v for k, v in bad.items() if v}, bad
    # the checker sees what it should: the driver does import them
    assert "saecli.config.load" in imported_modules(REPO / "saecli" / "runs" / "driver.py")
