"""Generated files stay in step with the code, and every example experiment validates against the schema."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest

from saecli.config.schema import generated_docs, json_schema, keys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").rglob("*.toml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_generated_docs_are_fresh():
    for path, text in generated_docs().items():
        assert (REPO / path).read_text() == text, f"{path} is stale: run scripts/make_docs.sh"


def test_config_md_lists_every_key_with_its_default():
    text = (REPO / "docs/config.md").read_text()
    assert "| `total_training_tokens` | an integer | `10000000` |" in text
    assert "| `auxk_coefficient` | a number | `0.03125` |" in text
    assert "| `lr` | a number | *(unset)* | default 4e-3 × min(1, √(4608 / d_sae))" in text  # resolved by d_sae
    assert "| `name` | a string | *(required)* |" in text  # [model] name
    assert "(transcoder) " in text and "| `rank_counts` |" in text  # kind-specific [sae] keys say whose they are
    for key in keys():
        assert f"| `{key.path.rsplit('.', 1)[1]}` |" in text


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_example_experiment_validates_against_the_schema(validator, path):
    errors = [
        f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(tomllib.loads(path.read_text()))
    ]
    assert not errors


def test_schema_describes_types_defaults_docs_and_choices(validator):
    schema = json_schema()
    auxk = schema["properties"]["trainer"]["properties"]["auxk_coefficient"]
    assert auxk["type"] == "number" and auxk["default"] == 1 / 32 and auxk["description"]
    activation = schema["properties"]["dictionary"]["allOf"][0]["then"]["properties"]["activation"]
    assert activation["enum"] == ["relu", "topk", "batchtopk", "jumprelu"] and activation["description"]
    assert schema["properties"]["activations"]["required"] == ["hook_points"]
    # what load_experiment refuses, the schema refuses too
    bad = [
        {"trainer": {"lr": "fast"}},  # wrong type
        {"sae": {"activation": "topq"}},  # not a choice (under the older name)
        {"dictionary": {"activation": "topq"}},  # ... and the canonical one
        {"dictionary": {"k": 8}, "sae": {"k": 16}},  # one table under both names
        {"trainer": {"lrr": 1e-3}},  # unknown key
        {"sae": {"kind": "sae", "hook_point_in": "blocks.0.hook_resid_post"}},  # a transcoder's key on an sae
        {"sae": {"kind": "molt", "rank_counts": {"4": "many"}}},  # nested value type
        {"analyze": {"histogram_range": [1e-3]}},  # a pair
    ]
    for doc in bad:
        assert list(validator.iter_errors(doc)), doc
    good = {
        "dictionary": {"kind": "transcoder", "hook_point_in": "blocks.0.ln2.hook_normalized", "d_sae": 64},
        "trainer": {"lr_warm_up_steps": 0.05, "total_training_tokens": 1000},
    }
    assert not list(validator.iter_errors(good))
    assert not list(validator.iter_errors({"sae": good["dictionary"]}))  # [sae]: the older name, still read


def test_schema_command_prints_the_schema(run_cli):
    res = run_cli("schema")
    assert res.exit_code == 0, res
    assert json.loads(res.stdout) == json_schema()


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_example_experiment_loads(path):
    from saecli.config.load import load_experiment

    exp = load_experiment(path)
    assert exp.activations is not None or exp.autointerp is not None  # what its command reads


TINY = [p for p in EXPERIMENTS if p.parent.name == "tiny" and p.stem not in ("generate", "sweep")]


@pytest.mark.slow
@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_every_tiny_experiment_trains_and_evaluates_in_seconds(cli, path, tmp_path):
    out = tmp_path / "run"
    short = [
        "--set",
        f"run.output_dir={out}",
        "--set",
        "activations.source=live",
        "--set",
        "trainer.total_training_tokens=2048",
    ]
    res = cli("train", path.relative_to(REPO), *short, timeout=300)
    assert res.exit_code == 0, res
    res = cli("eval", out, timeout=300)
    assert res.exit_code == 0, res
