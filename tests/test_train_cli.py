"""`saecli train` end to end on the tiny llama: live and from a cache, the run folder's rules, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import tiny_topk_toml

from saecli.config.load import load_experiment
from saecli.dictionaries.registry import load_dictionary
from saecli.training.logger import read_metrics

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tiny_toml(path: Path, model: Path, out: Path, *, steps: int = 60, cache: Path | None = None) -> Path:
    cache_line = f'cache_dir = "{cache}"' if cache else ""
    return tiny_topk_toml(
        path,
        model,
        out,
        name="tiny-cli",
        activations=f"""
        model_batch_size = 8
        batch_size = 256
        total_tokens = 12_000
        chunk_tokens = 2048
        shuffle_buffer_tokens = 4096
        {cache_line}
    """,
        trainer=f"""
        total_training_tokens = {256 * steps}
        lr = 3e-3
        log_frequency = 10
        n_checkpoints = 2
    """,
    )


def raw_explained_variance(exp, folder: Path) -> float:
    """EV of the saved (folded) dictionary on raw activations the stream gives for held-out text."""
    from saecli.data.open import open_stream

    sae = load_dictionary(folder)
    assert sae.folded  # the dataset-wise scale is in the weights: raw in, raw out
    hook = exp.activations.hook_points[0]
    batch = next(iter(open_stream(exp, purpose="eval")))
    x = batch.acts[hook]
    with torch.no_grad():
        x_hat = sae.reconstruct({hook: x})[hook]
    return float(1 - (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_train_live_end_to_end_and_the_run_folder_rules(cli, tiny_llama, tmp_path):
    toml = tiny_toml(tmp_path / "tiny.toml", tiny_llama, tmp_path / "run")
    res = cli("train", toml, env=ENV)
    assert res.exit_code == 0, res
    assert "final metrics" in res.stdout and "explained_variance" in res.stdout
    folder = tmp_path / "run"
    for name in ("sae_weights.safetensors", "cfg.json", "config.toml", "metrics.jsonl", "summary.json"):
        assert (folder / name).exists(), name
    assert [r["step"] for r in read_metrics(folder)] == [10, 20, 30, 40, 50, 60]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["explained_variance"] > 0.5
    # the saved dictionary reconstructs raw activations about as well as training measured
    exp = load_experiment(folder)  # the resolved config.toml is a complete experiment
    assert abs(raw_explained_variance(exp, folder) - summary["explained_variance"]) < 0.15

    again = cli("train", toml, env=ENV)
    assert again.exit_code == 2 and "--resume" in again.output and "--overwrite" in again.output
    done = cli("train", folder, "--resume", env=ENV)
    assert done.exit_code == 0 and "already finished" in done.output
    both = cli("train", toml, "--resume", "--overwrite", env=ENV)
    assert both.exit_code == 2


def test_train_from_a_cache(cli, tiny_llama, tmp_path):
    toml = tiny_toml(tmp_path / "tiny.toml", tiny_llama, tmp_path / "run", steps=30, cache=tmp_path / "cache")
    assert cli("generate", toml, env=ENV).exit_code == 0
    res = cli("train", toml, env=ENV)
    assert res.exit_code == 0, res
    records = read_metrics(tmp_path / "run")
    assert records[-1]["step"] == 30 and records[-1]["loss"] < records[0]["loss"]


def test_a_diverging_run_exits_1_with_a_clear_message(cli, tiny_llama, tmp_path):
    toml = tiny_toml(tmp_path / "tiny.toml", tiny_llama, tmp_path / "run", steps=20)
    res = cli("train", toml, "--set", "trainer.lr=1e30", env=ENV)
    assert res.exit_code == 1, res
    assert "NaN/inf" in res.output and "trainer.lr" in res.output
    assert not (tmp_path / "run" / "sae_weights.safetensors").exists()


def test_help_has_an_example(cli):
    res = cli("train", "--help")
    assert res.exit_code == 0 and "saecli train experiments/tiny/train.toml" in res.output
    assert "--resume" in res.output and "--overwrite" in res.output
