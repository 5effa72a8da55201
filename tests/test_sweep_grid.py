"""Sweep files: grid expansion, member names and folders, validation naming the member and key, grouping
by the schema's stream keys, spreading groups over processes, and `saecli sweep --dry-run`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from saecli.config.base import stream_keys
from saecli.config.experiment import Experiment
from saecli.config.load import read_toml
from saecli.errors import ConfigError
from saecli.sweep.grid import format_value, load_sweep
from saecli.sweep.grouping import differing_stream_keys, group_members, spread, stream_key_paths

BASE = """
[run]
name = "sw"
output_dir = "{out}"
[model]
name = "some/model"
[activations]
hook_points = ["blocks.3.hook_resid_post", "blocks.4.hook_resid_post"]
batch_size = 1024
[sae]
d_sae = 256
k = 16
[trainer]
total_training_tokens = 100_000
lr = 4e-4
"""


def sweep_file(tmp_path: Path, sweep: str, base: str = BASE) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(textwrap.dedent(base.format(out=tmp_path / "runs")) + textwrap.dedent(sweep))
    return path


def names(plan) -> list[str]:
    return [m.name for m in plan.members]


# ------------------------------------------------------------------------------------------ expansion
def test_grid_is_a_cartesian_product_with_readable_names_and_own_folders(tmp_path):
    plan = load_sweep(
        sweep_file(
            tmp_path,
            """
        [sweep]
        grid = {"trainer.lr" = [1e-4, 3e-4], "sae.k" = [16, 32]}
    """,
        )
    )
    assert names(plan) == ["lr=1e-4,k=16", "lr=1e-4,k=32", "lr=3e-4,k=16", "lr=3e-4,k=32"]
    m = plan.members[3]
    assert m.exp.trainer.lr == 3e-4 and m.exp.dictionary.k == 32
    assert m.overrides == {"trainer.lr": 3e-4, "sae.k": 32}
    assert m.folder == tmp_path / "runs" / "lr=3e-4,k=32"
    assert m.exp.run.output_dir == str(m.folder) and m.exp.run.name == "sw/lr=3e-4,k=32"
    assert m.exp.sweep is None  # a member's resolved config.toml carries no [sweep]
    assert plan.varying == ["trainer.lr", "sae.k"]


def test_nested_tables_variants_and_a_name_template(tmp_path):
    plan = load_sweep(
        sweep_file(
            tmp_path,
            """
        [sweep]
        name = "{sae.activation}-lr{trainer.lr}-{index}"
        [sweep.grid.trainer]
        lr = [1e-3, 2e-3]
        [[sweep.variants]]
        sae.activation = "topk"
        [[sweep.variants]]
        sae = {activation = "relu"}
        trainer.l1_coefficient = 5e-4
    """,
        )
    )
    assert names(plan) == ["topk-lr0.001-0", "relu-lr0.001-1", "topk-lr0.002-2", "relu-lr0.002-3"]
    relu = plan.members[1]
    assert (
        relu.exp.dictionary.activation == "relu"
        and relu.exp.trainer.l1_coefficient == 5e-4
        and relu.exp.trainer.lr == 1e-3
    )
    assert plan.members[0].exp.trainer.l1_coefficient == 0.5  # topk's default (resolved) where a variant is silent


def test_value_formatting():
    assert [format_value(v) for v in (3e-4, 1e-3, 0.5, 2.0, 12345.0, 0.0, 32, True, "relu", [8, 16])] == [
        "3e-4",
        "0.001",
        "0.5",
        "2",
        "1.2345e4",
        "0",
        "32",
        "true",
        "relu",
        "8+16",
    ]


def test_same_names_are_refused_with_a_hint(tmp_path):
    with pytest.raises(ConfigError, match="both get the name") as info:
        load_sweep(
            sweep_file(
                tmp_path,
                """
            [sweep]
            grid = {"trainer.lr" = [1e-4, 3e-4]}
            name = "same"
        """,
            )
        )
    assert info.value.key == "sweep.name"


# ------------------------------------------------------------------------------------------ errors
def test_a_bad_value_names_the_member_and_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_sweep(
            sweep_file(
                tmp_path,
                """
            [sweep]
            grid = {"sae.k" = [16, 0]}
        """,
            )
        )
    assert info.value.key == "sae.k"
    assert "k=0" in str(info.value) and "must be > 0" in str(info.value)


def test_an_unknown_key_gets_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.lrr.*did you mean `lr`"):
        load_sweep(
            sweep_file(
                tmp_path,
                """
            [sweep]
            grid = {"trainer.lrr" = [1e-4]}
        """,
            )
        )


@pytest.mark.parametrize(
    "sweep, key, message",
    [
        ('[sweep]\ngrid = {"trainer.lr" = 1e-4}\n', "sweep.grid.trainer.lr", "list of values"),
        ('[sweep]\ngrid = {"trainer.lr" = []}\n', "sweep.grid.trainer.lr", "at least one value"),
        (
            '[sweep]\ngrid = {"trainer.lr" = [1e-4]}\nvariants = [{"trainer.lr" = 1e-3}]\n',
            "sweep.variants[0].trainer.lr",
            "also in sweep.grid",
        ),
        ("[sweep]\neval = true\n", "sweep.grid", "give sweep.grid"),
    ],
)
def test_sweep_section_errors(tmp_path, sweep, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_sweep(sweep_file(tmp_path, sweep))
    assert info.value.key == key


def test_a_file_without_sweep_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"no \[sweep\] section"):
        load_sweep(sweep_file(tmp_path, ""))


# ------------------------------------------------------------------------------------------ grouping
def test_grouping_is_derived_from_the_schema():
    keys = stream_key_paths()
    assert set(keys) == stream_keys(Experiment)
    for key in (
        "model.name",
        "dataset.path",
        "activations.hook_points",
        "activations.context_size",
        "activations.batch_size",
        "trainer.total_training_tokens",
    ):
        assert key in keys
    for key in (
        "trainer.lr",
        "sae.k",
        "sae.d_sae",
        "sae.activation",
        "trainer.l1_coefficient",
        "run.seed",
        "init.bias_init_method",
        "trainer.lr_scheduler",
    ):
        assert key not in keys


@pytest.mark.parametrize(
    "grid, n_groups",
    [
        ('{"trainer.lr" = [1e-4, 3e-4], "sae.k" = [16, 32]}', 1),
        ('{"sae.d_sae" = [128, 256], "sae.activation" = ["topk", "relu"], "run.seed" = [0, 1]}', 1),
        ('{"trainer.l1_coefficient" = [1e-4, 1e-3], "init.bias_init_method" = ["zero", "mean"]}', 1),
        ('{"trainer.total_training_tokens" = [50_000, 100_000], "trainer.lr" = [1e-4, 3e-4]}', 2),
        ('{"activations.context_size" = [64, 128], "activations.batch_size" = [512, 1024]}', 4),
        ('{"model.name" = ["a/model", "b/model"], "sae.k" = [8, 16]}', 2),
        ('{"sae.hook_point" = ["blocks.3.hook_resid_post", "blocks.4.hook_resid_post"]}', 1),  # both in the stream
    ],
)
def test_grouping_on_sweep_files(tmp_path, grid, n_groups):
    plan = load_sweep(sweep_file(tmp_path, f"[sweep]\ngrid = {grid}\n"))
    groups = group_members(plan.members)
    assert len(groups) == n_groups
    for g in groups:  # inside a group no stream key differs
        for key in stream_key_paths():
            assert len({repr(m.value(key)) for m in g.members}) == 1, key


def test_different_kinds_that_read_whole_contexts_go_to_another_group(tmp_path):
    plan = load_sweep(
        sweep_file(
            tmp_path,
            """
        [sweep]
        variants = [{"sae.kind" = "sae"}, {"sae.kind" = "lorsa", "sae.n_qk_heads" = 4}]
    """,
            base=BASE.replace(
                'hook_points = ["blocks.3.hook_resid_post", "blocks.4.hook_resid_post"]',
                'hook_points = ["blocks.3.ln1.hook_normalized", "blocks.3.hook_attn_out"]',
            ),
        )
    )
    groups = group_members(plan.members)
    assert len(groups) == 2 and differing_stream_keys(groups) == ["(whole contexts)"]


def test_spreading_groups_over_ranks(tmp_path):
    plan = load_sweep(
        sweep_file(
            tmp_path,
            """
        [sweep]
        grid = {"trainer.total_training_tokens" = [50_000, 100_000], "trainer.lr" = [1e-4, 3e-4, 1e-3]}
    """,
        )
    )
    groups = group_members(plan.members)
    by_rank = spread(groups, 2)
    assert sorted(len(u.members) for units in by_rank for u in units) == [3, 3]
    assert {u.group.index for units in by_rank for u in units} == {0, 1}
    assert all(len(units) == 1 for units in by_rank)
    # one big group and 4 ranks: the group is cut into parts of members, every member exactly once
    one = group_members(plan.members[:3])
    by_rank = spread(one, 4)
    got = sorted(m.name for units in by_rank for u in units for m in u.members)
    assert got == sorted(m.name for m in plan.members[:3])
    assert sum(1 for units in by_rank if units) == 3  # 3 members: one rank has nothing to do
    assert spread(groups, 2) == spread(groups, 2)  # the same plan on every rank


# ------------------------------------------------------------------------------------------ the CLI
def test_dry_run_prints_members_and_groups(run_cli, tmp_path):
    path = sweep_file(
        tmp_path,
        """
        [sweep]
        grid = {"trainer.lr" = [1e-4, 3e-4], "activations.context_size" = [64, 128]}
    """,
    )
    result = run_cli("sweep", path, "--dry-run")
    assert result.exit_code == 0, result.output
    for name in ("lr=1e-4,context_size=64", "lr=3e-4,context_size=128"):
        assert name in result.output
    assert "2 group(s)" in result.output and "activations.context_size" in result.output
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_cli_errors_name_the_member(run_cli, tmp_path):
    path = sweep_file(tmp_path, '[sweep]\ngrid = {"sae.k" = [16, 512]}\n')
    result = run_cli("sweep", path, "--dry-run")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "k=512" in text and "sae.k" in text and "d_sae" in text


def test_the_example_sweep_files_parse():
    for path in ("experiments/tiny/sweep.toml", "experiments/smollm2/sweep.toml"):
        full = Path(__file__).resolve().parents[1] / path
        assert "sweep" in read_toml(full)
        plan = load_sweep(full)
        assert len(group_members(plan.members)) == 1 and len(plan.members) >= 4
