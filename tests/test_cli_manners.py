"""CLI manners: flags after the command, `--set` completion in every shell, help texts, the train header,
one tokens/s figure, whole progress lines in logs, typed sweep overrides, one store cfg shape."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_toml
from rich.console import Console

from saecli import ui
from saecli.cli import hoist_global_flags
from saecli.config import Experiment
from saecli.config.base import parse
from saecli.config.load import experiment_dict
from saecli.data.synthetic import SyntheticStream
from saecli.runs import train
from saecli.training.logger import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def experiment(folder: Path, **store) -> Experiment:
    return parse(
        Experiment,
        {
            "run": {"output_dir": str(folder), "name": "syn"},
            "sae": {"d_sae": 64, "k": 3, "activation": "topk"},
            "trainer": {
                "total_training_tokens": 128 * 30,
                "lr": 5e-3,
                "log_frequency": 10,
                "n_checkpoints": 0,
                "checkpoint_every_seconds": 0,
            },
            "store": store or {"backend": "none"},
        },
    )


def stream() -> SyntheticStream:
    return SyntheticStream(d_model=16, n_atoms=32, k=3, batch_size=128)


# ------------------------------------------------------------------------------------------ flags and help
def test_quiet_and_verbose_work_after_the_command(run_cli, tmp_path, tiny_gpt2):
    assert hoist_global_flags(["train", "x.toml", "-q", "--set", "a=1"]) == ["-q", "train", "x.toml", "--set", "a=1"]
    assert hoist_global_flags(["train", "--", "-v"]) == ["train", "--", "-v"]  # after `--` it is an argument
    exp = write_toml(tmp_path / "exp.toml", f'[model]\nname = "{tiny_gpt2}"\n')
    loud, quiet = run_cli("hooks", exp), run_cli("hooks", exp, "-q")
    assert "hook points, d_model 64" in loud.stderr and quiet.stderr == "" and quiet.stdout == loud.stdout
    res = run_cli("runs", "show", "x", "--store", tmp_path / "missing.db", "--verbose")
    assert res.exit_code == 2 and "Traceback" in res.stderr  # -v: tracebacks too


def test_sweep_help_shows_the_section_name(run_cli):
    res = run_cli("sweep", "--help")
    assert "a [sweep] table" in " ".join(res.stdout.split())


@pytest.mark.parametrize(
    "shell,env,expected",
    [
        (
            "bash",
            {"COMP_WORDS": "saecli train exp.toml --set trainer.lr_w", "COMP_CWORD": "4"},
            "trainer.lr_warm_up_steps",
        ),
        ("zsh", {"_TYPER_COMPLETE_ARGS": "saecli train exp.toml --set sae.activation=jump"}, "sae.activation=jumprelu"),
        (
            "fish",
            {
                "_TYPER_COMPLETE_ARGS": "saecli sweep exp.toml --set store.back",
                "_TYPER_COMPLETE_FISH_ACTION": "get-args",
            },
            "store.backend",
        ),
    ],
)
def test_set_completes_key_paths_in_every_shell(cli, shell, env, expected):
    res = cli(env={"_SAECLI_COMPLETE": f"complete_{shell}", **env})
    assert res.exit_code == 0, res
    assert expected in res.stdout


# ------------------------------------------------------------------------------------------ train output
def test_one_tokens_per_second_figure(tmp_path):
    folder = train(experiment(tmp_path / "run"), stream=stream()).folder
    import json

    summary = json.loads((folder / "summary.json").read_text())
    last = read_metrics(folder / "metrics.jsonl")[-1]
    assert summary["tokens"] == last["tokens"] == 128 * 30
    # defined once: tokens trained ÷ training wall time, in every record and in the summary
    for rec in (summary, last, *read_metrics(folder / "metrics.jsonl")):
        assert rec["tokens_per_s"] == pytest.approx(rec["tokens"] / rec["elapsed_s"], rel=1e-12)
    assert summary["tokens_per_s"] == last["tokens_per_s"]


def test_train_header_and_small_cache_note(tmp_path):
    from saecli.data.cache import write_cache
    from saecli.data.reader import CacheStream
    from saecli.dictionaries.registry import build_dictionary
    from saecli.runs.outputs import run_header
    from saecli.training.member import Member

    hook = "blocks.0.hook_resid_post"
    n = 1000
    write_cache(
        tmp_path / "cache",
        [{f"acts.{hook}": torch.randn(n, 16), "tokens": torch.zeros(n), "doc": torch.zeros(n), "pos": torch.arange(n)}],
        hook_points=[hook],
    )
    exp = parse(
        Experiment,
        {
            "run": {"name": "small"},
            "sae": {"d_sae": 64, "k": 4},
            "activations": {
                "hook_points": [hook],
                "cache_dir": str(tmp_path / "cache"),
                "batch_size": 100,
                "shuffle_buffer_tokens": 100,
            },
        },
    )
    cache = CacheStream(tmp_path / "cache", batch_size=100, buffer_tokens=100)
    member = Member(build_dictionary(exp.dictionary, 16, [hook]), exp.trainer, total_steps=25, batch_tokens=100)
    header, note = run_header(exp, cache, member)
    assert (
        header
        == f"small: cache {tmp_path / 'cache'} (1,000 tokens) · {hook} · d_sae 64 · 25 steps × 100 tokens · 1 process"
    )
    assert "loops over it 2.5 times" in note
    assert (
        len(
            run_header(
                exp,
                cache,
                Member(build_dictionary(exp.dictionary, 16, [hook]), exp.trainer, total_steps=10, batch_tokens=100),
            )
        )
        == 1
    )  # fits: no note


def test_logs_get_whole_progress_lines(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(ui, "console", Console(file=screen, width=40, force_terminal=False, soft_wrap=True))
    monkeypatch.setenv("SAECLI_PROGRESS_EVERY", "0")
    with ui.progress("train", total=300, own_rate=True) as bar:
        for i in range(3):
            bar.update(completed=100 * (i + 1), rate=2500.0, loss=0.123456, l0=31.5, explained_variance=0.875, dead=3)
    lines = screen.getvalue().splitlines()
    assert len(lines) == 3  # one per update here (every 30 s by default), none repeated at the end
    assert all(len(line) > 40 and line.endswith("loss 0.1235  l0 31.5  ev 0.875  dead 3") for line in lines)
    assert "2.50k tokens/s" in lines[-1] and "300/300" in lines[-1]


# ------------------------------------------------------------------------------------------ results
def test_sweep_summary_keeps_override_types(tmp_path):
    from saecli.sweep.grid import load_sweep
    from saecli.sweep.grouping import group_members
    from saecli.sweep.summary import collect_rows

    text = (REPO / "experiments/tiny/sweep.toml").read_text().replace('"runs/tiny/sweep"', f'"{tmp_path}"')
    plan = load_sweep(write_toml(tmp_path / "sweep.toml", text))
    rows = collect_rows(plan, group_members(plan.members))
    assert rows[0]["overrides"] == {"trainer.lr": 1e-3, "dictionary.k": 8}
    assert isinstance(rows[0]["overrides"]["dictionary.k"], int) and isinstance(
        rows[0]["overrides"]["trainer.lr"], float
    )


def test_store_keeps_one_cfg_shape_per_run(tmp_path):
    from saecli.commands.analyze import ensure_registered
    from saecli.config.load import read_toml
    from saecli.store import open_store

    store_cfg = {"backend": "sqlite", "path": str(tmp_path / "s.db")}
    exp = experiment(tmp_path / "run", **store_cfg)
    folder = train(exp, stream=stream()).folder
    with open_store(exp.store) as store:
        trained = store.get_sae("syn")["cfg"]
        assert trained == read_toml(folder / "config.toml")  # what config.toml says: every default resolved
        assert trained["trainer"]["k_aux"] == 8 and "k_aux" not in experiment_dict(exp)["trainer"]
        analyzed = parse(Experiment, {**experiment_dict(exp), "run": {"name": "other", "output_dir": str(folder)}})
        ensure_registered(store, analyzed, None, folder)  # analyze registering a run training did not
        assert store.get_sae("other")["cfg"] == experiment_dict(analyzed)
        assert set(trained) == set(store.get_sae("other")["cfg"])
