"""`saecli runs`: the store's runs with key metrics, filtered and sorted, from SQLite and MongoDB alike."""

from __future__ import annotations

import importlib.util
import json

import pytest

from saecli.commands.runs import describe, select
from saecli.config.run import StoreConfig
from saecli.store import open_store

HAVE_MONGOMOCK = importlib.util.find_spec("mongomock") is not None


def experiment_cfg(kind: str, hooks: list[str], **sae) -> dict:
    """A recorded cfg as train/eval/analyze write it: the resolved experiment."""
    return {"run": {"name": "x"}, "activations": {"hook_points": hooks}, "sae": {"kind": kind, **sae}}


def fill(store) -> None:
    store.put_sae(
        "topk-a",
        path="/runs/a",
        cfg=experiment_cfg("sae", ["blocks.6.hook_resid_post"], d_sae=4096),
        model_name="HuggingFaceTB/SmolLM2-135M",
        dataset_name="builtin:python-docs",
        metrics={"tokens": 1_000_000, "l0": 32.0, "explained_variance": 0.81, "dead": 12},
    )
    store.put_sae(
        "tc-b",
        path="/runs/b",
        cfg=experiment_cfg(
            "transcoder", ["blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out"], expansion_factor=8.0
        ),
        model_name="/work/models/tiny-llama",
        metrics={
            "tokens": 51_200,
            "l0": 8.0,
            "explained_variance": 0.6,
            "eval": {"explained_variance": 0.55, "loss_recovered": 0.9},
        },
    )
    # a record written before every command stored the experiment: the dictionary's own config
    store.put_sae(
        "old-c",
        path="/runs/c",
        cfg={
            "kind": "sae",
            "d_sae": 256,
            "in_hooks": ["blocks.1.hook_resid_post"],
            "out_hooks": ["blocks.1.hook_resid_post"],
            "cfg": {"kind": "sae"},
        },
        model_name="gpt2",
    )


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("mongomock", marks=pytest.mark.skipif(not HAVE_MONGOMOCK, reason="mongomock not installed")),
    ]
)
def store(request, tmp_path, monkeypatch):
    if request.param == "sqlite":
        s = open_store(StoreConfig(backend="sqlite", path=str(tmp_path / "runs.db")))
    else:
        import mongomock
        import mongomock.gridfs

        from saecli.store.mongo import MongoStore

        mongomock.gridfs.enable_gridfs_integration()  # as in test_store.py
        s = MongoStore("mongomock://", "t", client=mongomock.MongoClient())
    fill(s)
    yield s
    s.close()


def test_rows_show_kind_model_hook_and_key_metrics(store):
    rows = {r["name"]: r for r in map(describe, store.list_saes())}
    a, b, c = rows["topk-a"], rows["tc-b"], rows["old-c"]
    assert (a["kind"], a["model"], a["hook"], a["d_sae"], a["l0"], a["ev"], a["dead"]) == (
        "sae",
        "HuggingFaceTB/SmolLM2-135M",
        "blocks.6.hook_resid_post",
        4096,
        32.0,
        0.81,
        12,
    )
    assert b["kind"] == "transcoder" and b["hook"] == "blocks.3.ln2.hook_normalized → blocks.3.hook_mlp_out"
    assert (b["model"], b["d_sae"], b["ev"], b["loss_rec"]) == ("tiny-llama", "8×", 0.55, 0.9)  # eval's EV wins
    assert (c["kind"], c["hook"], c["d_sae"], c["l0"]) == ("sae", "blocks.1.hook_resid_post", 256, None)


def test_filter_and_sort(store):
    rows = [describe(r) for r in store.list_saes()]
    assert [r["name"] for r in select(rows, sort="l0")] == ["tc-b", "topk-a", "old-c"]  # unknown values last
    assert [r["name"] for r in select(rows, sort="l0", reverse=True)] == ["topk-a", "tc-b", "old-c"]
    assert [r["name"] for r in select(rows, kind="transcoder")] == ["tc-b"]
    assert [r["name"] for r in select(rows, model="smollm2")] == ["topk-a"]
    assert [r["name"] for r in select(rows, hook="mlp_out", sort="name")] == ["tc-b"]
    from saecli.errors import UsageError

    with pytest.raises(UsageError, match="did you mean 'l0'"):
        select(rows, sort="l00")


def test_runs_command_on_a_sqlite_store(run_cli, tmp_path):
    db = tmp_path / "saecli.db"
    with open_store(StoreConfig(backend="sqlite", path=str(db))) as s:
        fill(s)
    res = run_cli("runs", "--store", db, "--json", "--sort", "ev", "-r")
    assert res.exit_code == 0, res
    listed = json.loads(res.stdout)
    assert [r["name"] for r in listed] == ["topk-a", "tc-b", "old-c"]
    res = run_cli("runs", "--store", db, "--kind", "transcoder")
    assert res.exit_code == 0 and "tc-b" in res.stdout and "topk-a" not in res.stdout
    res = run_cli("runs", "show", "tc-b", "--store", db)
    assert res.exit_code == 0, res
    assert "/runs/b" in res.stdout and "loss_recovered" in res.stdout and "blocks.3.hook_mlp_out" in res.stdout
    res = run_cli("runs", "show", "tc-c", "--store", db)
    assert res.exit_code == 2 and "did you mean 'tc-b'" in res.stderr
    res = run_cli("runs", "--store", tmp_path / "typo.db")
    assert res.exit_code == 2 and "no store at" in res.stderr and not (tmp_path / "typo.db").exists()
