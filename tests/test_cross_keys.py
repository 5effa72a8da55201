"""Rules between the dictionary table and activations.hook_points: each kind declares its own
(`DictionaryConfig.check_stream_hooks`), and the error names the key as the file spells its table."""

import pytest

from saecli.config.load import experiment_from_dict
from saecli.errors import ConfigError


@pytest.mark.parametrize(
    ("hooks", "table", "dictionary", "key", "says"),
    [
        (["a", "b", "c"], "dictionary", {"kind": "clt"}, "activations.hook_points", "needs an even number, found 3"),
        (["a"], "sae", {"kind": "transcoder"}, "activations.hook_points", "set hook_point_out in [sae]"),
        (
            ["a"],
            "dictionary",
            {"kind": "molt", "d_sae": 64, "k": 8, "rank_counts": {"4": 64}},
            "activations.hook_points",
            "set hook_point_out in [dictionary]",
        ),
        (["a"], "sae", {"kind": "sae", "hook_point": "z"}, "sae.hook_point", "set sae.hook_point to one of them"),
        (
            ["a", "b"],
            "dictionary",
            {"kind": "transcoder", "hook_point_out": "z"},
            "dictionary.hook_point_out",
            "`z` is not among activations.hook_points (a, b)",
        ),
        (
            ["a", "b"],
            "dictionary",
            {"kind": "clt", "hook_points_in": ["a"], "hook_points_out": ["q"]},
            "dictionary.hook_points_out",
            "`q` is not among",
        ),
    ],
)
def test_a_hook_rule_names_the_key_as_the_file_spells_it(hooks, table, dictionary, key, says):
    data = {"activations": {"hook_points": hooks}, table: {"d_sae": 64, **dictionary}}
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(data, file="exp.toml")
    assert err.value.key == key
    assert says in str(err.value) and str(err.value).startswith("exp.toml: ")


@pytest.mark.parametrize(
    "dictionary",
    [{"kind": "sae"}, {"kind": "transcoder"}, {"kind": "clt"}, {"kind": "crosscoder", "hook_points": ["a", "b"]}],
)
def test_hooks_the_stream_lists_are_accepted(dictionary):
    exp = experiment_from_dict({"activations": {"hook_points": ["a", "b"]}, "dictionary": {"d_sae": 64, **dictionary}})
    assert exp.dictionary is not None and exp.dictionary.kind == dictionary["kind"]
