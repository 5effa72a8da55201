"""`saecli check`: a sound cache passes; each kind of damage is caught and named with its file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_toml
from safetensors.torch import load_file, save

from saecli.data.verify import check_against, check_cache


def _toml(folder: Path, model: Path, cache: Path, skip: int = 0) -> Path:
    return write_toml(
        folder / f"exp-{cache.name}.toml",
        f"""
[model]
name = "{model}"
device = "cpu"

[dataset]
skip_documents = {skip}

[activations]
hook_points = ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]
context_size = 32
model_batch_size = 8
total_tokens = 3000
chunk_tokens = 1000
shuffle_buffer_tokens = 4096
cache_dir = "{cache}"
""",
    )


def _generate(toml: Path) -> None:
    from saecli.config.load import load_experiment
    from saecli.data.cache import generate_shard
    from saecli.lm import load_model, run_to_hooks

    exp = load_experiment(toml)
    generate_shard(exp, load_model(exp.model), run_to_hooks, 0, 1)


@pytest.fixture(scope="module")
def caches(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """A sound cache, and one of different text (documents skipped) for --against."""
    root = tmp_path_factory.mktemp("check")
    out = {}
    for name, skip in (("good", 0), ("other_text", 50)):
        _generate(_toml(root, tiny_llama, root / name, skip))
        out[name] = root / name
    out["good_toml"] = root / "exp-good.toml"
    return out


@pytest.fixture
def damaged(caches, tmp_path) -> Path:
    """A fresh copy of the good cache to break."""
    target = tmp_path / "cache"
    shutil.copytree(caches["good"], target)
    return target


def _rehash(cache: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Rewrite a chunk and its manifest entry, so that only the content is wrong (not the hash)."""
    data = save(tensors, metadata={"format": "pt"})
    (cache / "shard-000" / name).write_bytes(data)
    mpath = cache / "shard-000" / "manifest.json"
    m = json.loads(mpath.read_text())
    entry = next(c for c in m["chunks"] if c["file"] == name)
    entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    mpath.write_text(json.dumps(m))


def test_sound_cache_passes(caches, cli):
    assert check_cache(caches["good"]) == []
    result = cli("check", caches["good"])
    assert result.exit_code == 0 and "sound" in result.output, result.output
    by_toml = cli("check", caches["good_toml"], "--against", caches["good"])
    assert by_toml.exit_code == 0 and "token ids match" in by_toml.output, by_toml.output


def test_flipped_bytes_fail_the_hash(damaged, cli):
    path = damaged / "shard-000" / "chunk-000001.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's data
    path.write_bytes(bytes(data))
    problems = check_cache(damaged)
    assert [(p.file, p.check) for p in problems][0] == ("shard-000/chunk-000001.safetensors", "sha256")
    result = cli("check", damaged)
    assert result.exit_code == 1 and "chunk-000001.safetensors" in result.output and "sha256" in result.output


def test_nan_is_caught(damaged):
    name = "chunk-000000.safetensors"
    tensors = load_file(damaged / "shard-000" / name)
    tensors["acts.blocks.1.hook_mlp_out"][5, 3] = float("nan")
    _rehash(damaged, name, tensors)
    problems = check_cache(damaged)
    assert len(problems) == 1
    assert problems[0].check == "finite" and "blocks.1.hook_mlp_out: 1 NaN" in problems[0].detail


def test_row_count_and_dtype_mismatch(damaged):
    name = "chunk-000002.safetensors"
    tensors = load_file(damaged / "shard-000" / name)
    tensors["acts.blocks.1.hook_resid_post"] = tensors["acts.blocks.1.hook_resid_post"][:-1]
    tensors["pos"] = tensors["pos"].long()
    _rehash(damaged, name, tensors)
    found = {(p.check, p.detail.split(" ")[0]) for p in check_cache(damaged)}
    assert ("shape", "`acts.blocks.1.hook_resid_post`") in found and ("shape", "`pos`") in found


def test_missing_and_extra_chunks(damaged):
    (damaged / "shard-000" / "chunk-000001.safetensors").unlink()
    (damaged / "shard-000" / "chunk-000009.safetensors").write_bytes(b"stray")
    problems = {(p.file, p.check) for p in check_cache(damaged)}
    assert ("shard-000/chunk-000001.safetensors", "missing file") in problems
    assert ("shard-000/chunk-000009.safetensors", "extra file") in problems


def test_manifest_norms_are_checked(damaged):
    mpath = damaged / "shard-000" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["mean_norms"]["blocks.1.hook_resid_post"] *= 2
    mpath.write_text(json.dumps(m))
    assert [p.check for p in check_cache(damaged)] == ["norms"]


def test_token_mismatch_against_other_text(caches, cli):
    problems = check_against(caches["good"], caches["other_text"])
    assert len(problems) == 1 and problems[0].file == "shard-000/chunk-000000.safetensors"
    assert "not of the same text" in problems[0].detail
    result = cli("check", caches["good"], "--against", caches["other_text"])
    assert result.exit_code == 1 and "token id at token 0" in result.output and "against" in result.output


def test_usage_errors_exit_2(tmp_path, cli):
    assert cli("check", tmp_path / "nothing").exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("check", empty)
    assert result.exit_code == 2, result.output
