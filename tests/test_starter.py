"""`saecli init KIND`: a commented starter that is a valid experiment for every kind, and trains as written."""

from __future__ import annotations

import jsonschema
import pytest
from conftest import REPO

from saecli.config.load import load_experiment, tomllib
from saecli.config.schema import json_schema
from saecli.config.starter import KINDS, ModelShape, starter_toml
from saecli.errors import UsageError

SMOLLM2 = ModelShape("HuggingFaceTB/SmolLM2-135M", n_layers=30, d_model=576, n_heads=9)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_gets_a_valid_commented_starter(kind, tmp_path):
    text = starter_toml(kind, SMOLLM2)
    path = tmp_path / f"{kind}.toml"
    path.write_text(text)
    exp = load_experiment(path)
    assert exp.dictionary.kind == kind and exp.model.name == SMOLLM2.name
    assert not list(jsonschema.Draft7Validator(json_schema()).iter_errors(tomllib.loads(text)))
    assert "# tokens to train on\ntotal_training_tokens = 10000000" in text  # each key with its help


def test_default_hooks_follow_the_kind():
    hooks = lambda kind, **kw: tomllib.loads(starter_toml(kind, SMOLLM2, **kw))["activations"]["hook_points"]  # noqa: E731
    assert hooks("sae") == ["blocks.15.hook_resid_post"]
    # as SAELens transcoders: what the MLP reads (after its norm) → what it adds to the residual
    assert hooks("transcoder") == ["blocks.15.ln2.hook_normalized", "blocks.15.hook_mlp_out"]
    assert hooks("molt", hook="blocks.3.ln2.hook_normalized") == [
        "blocks.3.ln2.hook_normalized",
        "blocks.3.hook_mlp_out",
    ]
    assert hooks("lorsa") == ["blocks.15.ln1.hook_normalized", "blocks.15.hook_attn_out"]
    assert hooks("crosscoder", hook="blocks.29.hook_resid_post") == [
        "blocks.28.hook_resid_post",
        "blocks.29.hook_resid_post",
    ]
    assert len(hooks("clt")) == 2 * 30
    with pytest.raises(UsageError, match="hook_resid_post"):
        starter_toml("sae", SMOLLM2, hook="blocks.3.resid")
    with pytest.raises(UsageError, match="did you mean 'transcoder'"):
        starter_toml("transcodr", SMOLLM2)


def test_init_writes_a_starter_that_trains_as_written(cli, tmp_path, tiny_llama):
    res = cli("init", "transcoder", "--model", tiny_llama, "--tokens", "2048", "-o", tmp_path / "tc.toml")
    assert res.exit_code == 0, res
    text = (tmp_path / "tc.toml").read_text()
    assert "blocks.2.ln2.hook_normalized" in text  # the tiny llama has 4 layers: the middle one, read from its config
    res = cli("init", "transcoder", "--model", tiny_llama, "-o", tmp_path / "tc.toml")
    assert res.exit_code == 2 and "exists" in res.stderr
    res = cli("train", "tc.toml", cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    assert res.exit_code == 0, res
    assert (tmp_path / "runs/transcoder-L2/sae_weights.safetensors").exists()
    assert (tmp_path / "saecli.db").exists()  # recorded in the store the starter names
