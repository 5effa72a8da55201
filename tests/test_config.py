"""Experiment files: typed parsing, clear errors naming the key path, overrides, resolved round trip."""

from __future__ import annotations

import pytest

from saecli.config.base import stream_keys
from saecli.config.experiment import Experiment
from saecli.config.load import (
    absolute_paths,
    apply_overrides,
    experiment_from_dict,
    experiment_to_toml,
    load_experiment,
    parse_override,
    read_toml,
)
from saecli.errors import ConfigError, UsageError

BASE = {
    "model": {"name": "some/model"},
    "activations": {"hook_points": ["blocks.3.hook_resid_post"]},
    "sae": {"d_sae": 256, "k": 16},
}


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        experiment_from_dict(data, file="exp.toml")
    return str(info.value)


def test_defaults_fill_every_section():
    exp = experiment_from_dict(BASE)
    assert exp.dictionary.kind == "sae" and exp.dictionary.activation == "topk" and exp.dictionary.k == 16
    assert exp.trainer.lr_scheduler == "constantwithwarmup"
    assert exp.dataset.path == "builtin:python-docs"
    assert exp.activations.context_size == 256


def test_toml_float_that_is_integral_is_accepted_for_int_keys():
    exp = experiment_from_dict({**BASE, "trainer": {"total_training_tokens": 1e6}})
    assert exp.trainer.total_training_tokens == 1_000_000
    assert isinstance(exp.trainer.total_training_tokens, int)


def test_steps_keep_int_or_fraction():
    exp = experiment_from_dict({**BASE, "trainer": {"lr_warm_up_steps": 100, "lr_cool_down_steps": 0.2}})
    assert exp.trainer.lr_warm_up_steps == 100 and isinstance(exp.trainer.lr_warm_up_steps, int)
    assert exp.trainer.lr_cool_down_steps == 0.2


def test_unknown_key_suggests_the_close_one():
    msg = error_of({**BASE, "trainer": {"lr_sheduler": "constant"}})
    assert "exp.toml" in msg and "unknown key `trainer.lr_sheduler`" in msg and "did you mean `lr_scheduler`" in msg


def test_unknown_section_is_named():
    msg = error_of({**BASE, "trainr": {}})
    assert "unknown key `trainr`" in msg and "`trainer`" in msg


def test_wrong_type_names_key_expected_and_found():
    msg = error_of({**BASE, "trainer": {"lr": "fast"}})
    assert "key `trainer.lr`" in msg and "expected a number" in msg and "string 'fast'" in msg


def test_bool_is_not_a_number():
    msg = error_of({**BASE, "trainer": {"lr": True}})
    assert "trainer.lr" in msg


def test_bad_choice_suggests():
    msg = error_of({**BASE, "sae": {"d_sae": 8, "activation": "topkk"}})
    assert "sae.activation" in msg and "did you mean 'topk'" in msg


def test_bad_value_from_validate_names_full_key():
    msg = error_of({**BASE, "activations": {"hook_points": ["x"], "batch_size": 0}})
    assert "key `activations.batch_size`" in msg and "must be > 0" in msg


def test_list_item_type_names_index():
    msg = error_of({**BASE, "activations": {"hook_points": ["a", 3]}})
    assert "activations.hook_points[1]" in msg


def test_missing_required_key():
    msg = error_of({**BASE, "activations": {"context_size": 8}})
    assert "activations.hook_points" in msg and "missing required key" in msg


def test_unknown_kind():
    msg = error_of({**BASE, "sae": {"kind": "sea", "d_sae": 8}})
    assert "sae.kind" in msg and "did you mean 'sae'" in msg


def test_k_larger_than_d_sae():
    msg = error_of({**BASE, "sae": {"d_sae": 8, "k": 16}})
    assert "sae.k" in msg


def test_fraction_out_of_range():
    msg = error_of({**BASE, "trainer": {"lr_warm_up_steps": 1.5}})
    assert "trainer.lr_warm_up_steps" in msg


def test_syntax_error_shows_line_and_column(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nname = "x"\n[trainer]\nlr = = 3\n')
    with pytest.raises(ConfigError) as info:
        read_toml(path)
    assert "line 4" in str(info.value) and "column" in str(info.value) and "bad.toml" in str(info.value)


def test_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        read_toml(tmp_path / "nope.toml")


def test_overrides_are_typed_like_toml():
    assert parse_override("trainer.lr=1e-3") == (["trainer", "lr"], 1e-3)
    assert parse_override("sae.activation=relu") == (["sae", "activation"], "relu")
    assert parse_override("activations.hook_points=['a','b']") == (["activations", "hook_points"], ["a", "b"])
    assert parse_override("wandb.enabled=true") == (["wandb", "enabled"], True)
    data = apply_overrides(BASE, ["sae.k=8", "trainer.lr=0.01"])
    exp = experiment_from_dict(data)
    assert exp.dictionary.k == 8 and exp.trainer.lr == 0.01
    assert BASE["sae"]["k"] == 16  # the original dict is untouched


def test_bad_override_syntax():
    with pytest.raises(UsageError):
        parse_override("trainer.lr")


def test_resolved_config_round_trips(tmp_path):
    exp = experiment_from_dict({**BASE, "trainer": {"lr": 3e-4, "betas": [0.9, 0.99]}})
    path = tmp_path / "config.toml"
    path.write_text(experiment_to_toml(exp))
    again = load_experiment(path)
    again.source_file = None
    exp.source_file = None
    assert again == absolute_paths(exp)  # relative paths are taken from the current directory when loaded
    # a run folder holding config.toml is accepted in place of the file
    assert load_experiment(tmp_path).trainer.lr == 3e-4


def test_stream_keys_come_from_the_schema():
    keys = stream_keys(Experiment)
    assert "model.name" in keys and "activations.hook_points" in keys and "dataset.path" in keys
    assert "trainer.lr" not in keys and "dictionary.k" not in keys and "dictionary.d_sae" not in keys


# ------------------------------------------------------------------------------------------ [dictionary] / [sae]
NEW = {**{k: v for k, v in BASE.items() if k != "sae"}, "dictionary": BASE["sae"]}


def test_dictionary_is_the_table_and_sae_its_older_name():
    assert experiment_from_dict(NEW) == experiment_from_dict(BASE)  # BASE spells it [sae]
    assert experiment_from_dict(BASE).dictionary is not None  # [sae] fills exp.dictionary
    assert (
        experiment_from_dict({**NEW, "dictionary": {"kind": "crosscoder", "d_sae": 64}}).dictionary.kind == "crosscoder"
    )
    written = read_toml_text(experiment_to_toml(experiment_from_dict(BASE)))
    assert "dictionary" in written and "sae" not in written  # config.toml names it for what it holds
    msg = error_of({**BASE, "dictionary": {"k": 8}})
    assert "`[dictionary]` and `[sae]`" in msg and "give one of them" in msg


def test_errors_name_the_table_as_the_file_spells_it():
    assert "key `sae.k`" in error_of({**BASE, "sae": {"d_sae": 8, "k": 0}})
    assert "key `dictionary.k`" in error_of({**NEW, "dictionary": {"d_sae": 8, "k": 0}})
    assert "did you mean `k`" in error_of({**NEW, "dictionary": {"d_sae": 8, "kk": 3}})
    assert "did you mean `dictionary`" in error_of({**NEW, "dictionry": {}})


def test_overrides_and_sweep_keys_reach_the_table_under_either_name():
    for data in (BASE, NEW):
        for key in ("sae.k", "dictionary.k"):
            assert experiment_from_dict(apply_overrides(data, [f"{key}=8"])).dictionary.k == 8, (data, key)
    from saecli.config.sweep import SweepConfig
    from saecli.sweep.grid import plan_from_dict

    for key in ("sae.k", "dictionary.k"):
        plan = plan_from_dict(NEW, SweepConfig(grid={key: [4, 8]}))
        assert [m.exp.dictionary.k for m in plan.members] == [4, 8]
        assert [m.name for m in plan.members] == ["k=4", "k=8"]


def read_toml_text(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)
