"""The cache layout: shards, manifests, atomic chunk writes, resume bookkeeping, several writers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_toml

from saecli.data.cache import generate_shard, write_cache
from saecli.data.manifest import identity_mismatch, open_cache, shard_plan, shard_target
from saecli.data.reader import CacheStream
from saecli.errors import RunError, UsageError

HOOK = "blocks.1.hook_resid_post"


def test_shard_plan_from_launcher_environment():
    assert shard_plan(1, 0, env={}) == (0, 1)
    assert shard_plan(4, 2, env={}) == (2, 4)
    assert shard_plan(1, 0, env={"WORLD_SIZE": "2", "RANK": "1"}) == (1, 2)  # one shard per process
    assert shard_plan(8, 4, env={"WORLD_SIZE": "4", "RANK": "3"}) == (7, 8)
    with pytest.raises(UsageError, match="n_shards >= 6"):
        shard_plan(4, 2, env={"WORLD_SIZE": "4", "RANK": "0"})
    assert [shard_target(10, s, 3) for s in range(3)] == [4, 3, 3]


def test_identity_mismatch_names_the_key():
    a = {"model": {"name": "m", "dtype": "float32"}, "context_size": 64}
    assert identity_mismatch(a, json.loads(json.dumps(a))) is None
    assert identity_mismatch(a, {**a, "context_size": 128}) == "context_size is 64 in the cache but 128 now"
    b = {**a, "model": {"name": "m", "dtype": "bfloat16"}}
    assert identity_mismatch(a, b) == "model.dtype is 'float32' in the cache but 'bfloat16' now"


def test_write_cache_and_read_it_back(tmp_path):
    chunks = [
        {
            f"acts.{HOOK}": torch.full((n, 4), float(i + 1)),
            "tokens": torch.arange(n),
            "doc": torch.zeros(n),
            "pos": torch.arange(n),
        }
        for i, n in enumerate((5, 3))
    ]
    m = write_cache(tmp_path / "c", chunks, hook_points=[HOOK], dtype="bfloat16")
    assert [c["file"] for c in m["chunks"]] == ["chunk-000000.safetensors", "chunk-000001.safetensors"]
    assert m["total_tokens"] == 8 and m["complete"] and m["d_model"] == {HOOK: 4}
    # mean ‖x‖: five rows of norm 2 and three of norm 4
    assert m["mean_norms"][HOOK] == pytest.approx((5 * 2 + 3 * 4) / 8)
    on_disk = json.loads((tmp_path / "c" / "shard-000" / "manifest.json").read_text())
    assert on_disk == m
    batch = next(CacheStream(tmp_path / "c", batch_size=8, shuffle=False))
    assert batch.acts[HOOK].dtype == torch.bfloat16 and batch.acts[HOOK][:, 0].tolist() == [1] * 5 + [2] * 3
    with pytest.raises(UsageError, match="already holds"):
        write_cache(tmp_path / "c", chunks, hook_points=[HOOK])


def test_damaged_chunk_is_found_when_a_reader_opens(tmp_path):
    chunks = [
        {f"acts.{HOOK}": torch.ones(6, 4), "tokens": torch.arange(6), "doc": torch.zeros(6), "pos": torch.arange(6)}
    ]
    write_cache(tmp_path / "c", chunks, hook_points=[HOOK])
    path = tmp_path / "c" / "shard-000" / "chunk-000000.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UsageError, match="truncated"):  # the sizes are checked before any batch
        CacheStream(tmp_path / "c", batch_size=4)


def _exp(tmp_path, model, extra: str = "", total: int = 1000):
    from saecli.config.load import load_experiment

    return load_experiment(
        write_toml(
            tmp_path / "exp.toml",
            f"""
[model]
name = "{model}"
device = "cpu"

[activations]
hook_points = ["{HOOK}"]
context_size = 32
model_batch_size = 4
total_tokens = {total}
chunk_tokens = 200
cache_dir = "{tmp_path / "cache"}"
{extra}
""",
        )
    )


@pytest.fixture(scope="module")
def lm(tiny_llama):
    from saecli.config.model import ModelConfig
    from saecli.lm import load_model

    return load_model(ModelConfig(name=str(tiny_llama), device="cpu"))


def test_shards_split_the_documents_and_readers_see_all(tmp_path, tiny_llama, lm):
    from saecli.lm import run_to_hooks

    exp = _exp(tmp_path, tiny_llama, "n_shards = 2")
    for shard in (1, 0):  # two writers, in any order
        m = generate_shard(exp, lm, run_to_hooks, shard, 2)
        assert m["shard"] == shard and m["total_tokens"] == 500 and m["complete"]
    index = open_cache(tmp_path / "cache")
    assert len(index.manifests) == 2 and index.total_tokens == 1000
    docs = [
        set(
            CacheStream(tmp_path / "cache", batch_size=10_000, rank=r, world_size=2, epochs=1, shuffle=False)
            .__next__()
            .doc.tolist()
        )
        for r in range(2)
    ]
    shard_docs = [{d % 2 for d in ds} for ds in docs]
    assert shard_docs[0] | shard_docs[1] == {0, 1}  # both shards' documents are read
    everything = torch.cat([b.doc for b in CacheStream(tmp_path / "cache", batch_size=300, epochs=1)])
    assert len(everything) == 1000 and {int(d) % 2 for d in everything} == {0, 1}
    assert index.documents_consumed == max(int(m["documents_consumed"]) for m in index.manifests)


def test_resume_discards_unlisted_files_and_continues(tmp_path, tiny_llama, lm):
    from saecli.lm import run_to_hooks

    exp = _exp(tmp_path, tiny_llama)
    whole = generate_shard(exp, lm, run_to_hooks, 0, 1)
    folder = tmp_path / "cache" / "shard-000"
    # simulate a kill after chunk 2 was written but before the manifest listed it, and a half-written temp file
    m = json.loads((folder / "manifest.json").read_text())
    m["chunks"] = m["chunks"][:2]
    m["total_tokens"] = sum(c["n_tokens"] for c in m["chunks"])
    m["contexts_consumed"] = m["chunks"][-1]["contexts_end"]
    m["complete"] = False
    (folder / "manifest.json").write_text(json.dumps(m))
    (folder / ".chunk-000003.safetensors.abc.tmp").write_bytes(b"partial")
    again = generate_shard(exp, lm, run_to_hooks, 0, 1)
    assert again == whole
    assert not list(folder.glob(".*.tmp"))
    (folder / "chunk-000001.safetensors").unlink()
    with pytest.raises(RunError, match="chunk-000001"):
        generate_shard(_exp(tmp_path, tiny_llama, total=2000), lm, run_to_hooks, 0, 1)


def test_text_that_runs_out_ends_the_shard(tmp_path, tiny_llama, lm):
    from saecli.lm import run_to_hooks

    text = tmp_path / "few.jsonl"
    text.write_text("".join(json.dumps({"text": f"The def statement {i} " * 40}) + "\n" for i in range(5)))
    exp = _exp(tmp_path, tiny_llama, f'[dataset]\npath = "{text}"\nmax_documents = 4', total=1_000_000)
    m = generate_shard(exp, lm, run_to_hooks, 0, 1)
    assert m["complete"] and m["exhausted"] and 0 < m["total_tokens"] < 1_000_000
    assert m["documents_consumed"] == 4
    assert generate_shard(exp, lm, run_to_hooks, 0, 1) == m  # nothing more to do


def test_tokeniser_process_gives_the_same_cache(tmp_path, tiny_llama, lm, monkeypatch):
    """GPU runs read and pack the text in a child process: same chunks, and its errors arrive as ours."""
    from saecli.data.producer import context_batches
    from saecli.data.tokens import packer_for
    from saecli.lm import run_to_hooks

    exp = _exp(tmp_path, tiny_llama)
    in_thread = generate_shard(exp, lm, run_to_hooks, 0, 1)
    (tmp_path / "thread").mkdir()
    for f in (tmp_path / "cache" / "shard-000").iterdir():
        f.rename(tmp_path / "thread" / f.name)
    monkeypatch.setenv("SAECLI_TOKENIZE_PROCESS", "1")
    assert generate_shard(exp, lm, run_to_hooks, 0, 1) == in_thread
    for f in (tmp_path / "thread").iterdir():
        assert f.read_bytes() == (tmp_path / "cache" / "shard-000" / f.name).read_bytes()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text column"}\n')
    exp.dataset.path = str(bad)
    batches = context_batches(packer_for(lm, exp.activations), exp.dataset, 0, 1, 4, process=True)
    with pytest.raises(UsageError, match="dataset.text_column"):
        next(batches)
    batches.close()
    early = context_batches(packer_for(lm, exp.activations), _exp(tmp_path, tiny_llama).dataset, 0, 1, 4, process=True)
    assert len(next(early)) == 4
    early.close()  # stops the child mid-text
    assert early._proc.poll() is not None
