"""`saecli generate`: a cache whose activations are the model's, and a killed run that resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_toml
from safetensors.torch import load_file

from saecli.config.load import load_experiment
from saecli.data.manifest import act_key, open_cache
from saecli.errors import UsageError

HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]


def experiment(
    tmp_path: Path,
    model: Path,
    *,
    name: str = "exp",
    cache: str = "cache",
    total: int = 6000,
    chunk: int = 1024,
    extra: str = "",
    dataset: str = "",
) -> Path:
    return write_toml(
        tmp_path / f"{name}.toml",
        f"""
[model]
name = "{model}"
device = "cpu"

[dataset]
{dataset}

[activations]
hook_points = {json.dumps(HOOKS)}
context_size = 32
model_batch_size = 8
batch_size = 256
total_tokens = {total}
chunk_tokens = {chunk}
shuffle_buffer_tokens = 1024
cache_dir = "{tmp_path / cache}"
{extra}
""",
    )


def test_generate_writes_the_models_activations(tmp_path, tiny_llama, cli):
    toml = experiment(tmp_path, tiny_llama)
    result = cli("generate", toml)
    assert result.exit_code == 0, result.output
    index = open_cache(tmp_path / "cache")
    m = index.first
    assert m["complete"] and m["total_tokens"] == 6000 == index.total_tokens
    assert m["hook_points"] == HOOKS and m["d_model"] == {h: 64 for h in HOOKS} and m["dtype"] == "float32"
    assert m["model"]["family"] == "llama" and m["model"]["n_layers"] == 4 and m["prepend_bos"]
    assert all(c["n_tokens"] >= 1024 for c in m["chunks"][:-1])
    assert (tmp_path / "cache" / "config.toml").exists()

    # the first chunk holds exactly what the truncated forward gives on the same packed contexts
    from saecli.data.text import iter_documents
    from saecli.data.tokens import packer_for
    from saecli.lm import load_model, run_to_hooks

    exp = load_experiment(toml)
    lm = load_model(exp.model)
    packer = packer_for(lm, exp.activations, exp.model)
    chunk = load_file(index.chunks[0].path)
    row = 0
    norms = {h: 0.0 for h in HOOKS}
    for ctx in packer.contexts(iter_documents(exp.dataset), 8):
        acts = run_to_hooks(lm, ctx.tokens, HOOKS)
        keep = ctx.kept()
        n = len(keep)
        if row + n > chunk["tokens"].shape[0]:
            break
        assert torch.equal(chunk["tokens"][row : row + n].long(), ctx.tokens.reshape(-1)[keep])
        assert torch.equal(chunk["doc"][row : row + n], ctx.doc.reshape(-1)[keep])
        for h in HOOKS:
            want = acts[h].reshape(-1, 64)[keep]
            assert torch.equal(chunk[act_key(h)][row : row + n], want)
            norms[h] += float(want.norm(dim=1).double().sum())
        row += n
    assert row == chunk["tokens"].shape[0]  # chunks end on whole model batches
    for h in HOOKS:
        assert m["chunks"][0]["norm_sums"][h] == pytest.approx(norms[h], rel=1e-6)
        mean = sum(c["norm_sums"][h] for c in m["chunks"]) / m["total_tokens"]
        assert m["mean_norms"][h] == pytest.approx(mean, rel=1e-12) and mean > 0


def _wait_for_first_chunk(proc: subprocess.Popen, manifest: Path, timeout: float = 120) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if manifest.exists():
            try:
                if json.loads(manifest.read_text())["chunks"]:
                    return
            except ValueError:
                pass
        if proc.poll() is not None:
            raise AssertionError(f"generate ended before its first chunk: {proc.communicate()}")
        time.sleep(0.01)
    raise AssertionError("no chunk appeared")


def test_killed_generate_resumes_byte_identical(tmp_path, tiny_llama, cli):
    extra = 'override_dtype = "bfloat16"'
    whole = experiment(tmp_path, tiny_llama, name="whole", cache="whole", total=12000, chunk=256, extra=extra)
    killed = experiment(tmp_path, tiny_llama, name="killed", cache="killed", total=12000, chunk=256, extra=extra)
    manifest = tmp_path / "killed" / "shard-000" / "manifest.json"
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.Popen(
        [sys.executable, "-m", "saecli", "generate", str(killed)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for_first_chunk(proc, manifest)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = json.loads(manifest.read_text())
    assert not partial["complete"], "the run finished before it was killed: make it longer"

    resumed = cli("generate", killed)
    assert resumed.exit_code == 0 and "resuming after" in resumed.output, resumed.output
    generate(whole)
    a, b = tmp_path / "whole" / "shard-000", tmp_path / "killed" / "shard-000"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    assert load_file(a / "chunk-000000.safetensors")[act_key(HOOKS[0])].dtype == torch.bfloat16

    # a finished cache is left alone; a different config in the same folder is refused
    generate(killed)
    assert (b / "manifest.json").read_bytes() == (a / "manifest.json").read_bytes()
    with pytest.raises(UsageError, match="context_size is 32 in the cache but 64 now"):
        generate(killed, "activations.context_size=64")


def generate(toml: Path, *overrides: str) -> dict:
    """What `saecli generate` does, in this process (no interpreter start-up)."""
    from saecli.data.cache import generate_shard
    from saecli.lm import load_model, run_to_hooks

    exp = load_experiment(toml, list(overrides))
    return generate_shard(exp, load_model(exp.model), run_to_hooks, 0, 1)


def test_generate_config_errors_exit_2(tmp_path, tiny_llama, cli):
    toml = experiment(tmp_path, tiny_llama)
    bad_hook = cli("generate", toml, "--set", 'activations.hook_points=["blocks.9.hook_resid_post"]')
    assert bad_hook.exit_code == 2 and "blocks.9.hook_resid_post" in bad_hook.output
    typo = cli("generate", toml, "--set", "activations.chunk_token=5")
    assert typo.exit_code == 2 and "chunk_tokens" in typo.output
    no_dir = write_toml(tmp_path / "nodir.toml", toml.read_text().replace(f'cache_dir = "{tmp_path / "cache"}"', ""))
    result = cli("generate", no_dir)
    assert result.exit_code == 2 and "activations.cache_dir" in result.output
    missing = cli("generate", toml, "--set", f'dataset.path="{tmp_path / "none.jsonl"}"')
    assert missing.exit_code == 2 and "dataset.path" in missing.output
    assert not (tmp_path / "cache" / "shard-000" / "manifest.json").exists()


@pytest.mark.distributed
def test_torchrun_processes_write_one_shard_each(tmp_path, tiny_llama, cli):
    """Under torchrun (RANK/WORLD_SIZE) each process writes its own shard; readers and check see both."""
    toml = experiment(tmp_path, tiny_llama, total=2000, chunk=512)
    env = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "saecli", "generate", str(toml)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    index = open_cache(tmp_path / "cache")
    assert [m["shard"] for m in index.manifests] == [0, 1] and {m["n_shards"] for m in index.manifests} == {2}
    assert index.total_tokens == 2000
    docs = [set(load_file(c.path)["doc"].tolist()) for c in index.chunks]
    assert all(d % 2 == c.shard for c, ds in zip(index.chunks, docs) for d in ds)  # documents split by shard
    assert cli("check", tmp_path / "cache").exit_code == 0
