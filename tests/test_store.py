"""The store contract, run against every backend available here.

sqlite always; "mongomock" when the mongomock package is installed; a real MongoDB when
SAECLI_TEST_MONGO_URI is set (see docs/store.md for starting one).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import pytest

from saecli.config.run import StoreConfig
from saecli.errors import RunError, UsageError
from saecli.store import NullStore, Store, open_store

MONGO_URI = os.environ.get("SAECLI_TEST_MONGO_URI")
HAVE_MONGOMOCK = importlib.util.find_spec("mongomock") is not None


@dataclass
class Backend:
    """Opens handles on one fresh store; `cfg` is None when only this process can reach it."""

    name: str
    opener: object
    cfg: StoreConfig | None

    def open(self) -> Store:
        return self.opener()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("mongomock", marks=pytest.mark.skipif(not HAVE_MONGOMOCK, reason="mongomock not installed")),
        pytest.param("mongodb", marks=pytest.mark.skipif(not MONGO_URI, reason="SAECLI_TEST_MONGO_URI not set")),
    ]
)
def backend(request, tmp_path, monkeypatch):
    # small write batches, so that a few dozen features already span several transactions
    monkeypatch.setattr("saecli.store.sqlite.BATCH_ROWS", 16)
    monkeypatch.setattr("saecli.store.mongo.BATCH_DOCS", 16)
    if request.param == "sqlite":
        cfg = StoreConfig(backend="sqlite", path=str(tmp_path / "store.db"))
        yield Backend("sqlite", lambda: open_store(cfg), cfg)
    elif request.param == "mongomock":
        import mongomock
        import mongomock.collection
        import mongomock.gridfs

        from saecli.store.mongo import MongoStore

        mongomock.gridfs.enable_gridfs_integration()
        # mongomock 4.3 predates pymongo's `sort` argument of bulk updates (always None here)
        builder = mongomock.collection.BulkOperationBuilder
        add_update = builder.add_update
        monkeypatch.setattr(builder, "add_update", lambda self, *a, sort=None, **k: add_update(self, *a, **k))
        client = mongomock.MongoClient()
        yield Backend("mongomock", lambda: MongoStore("mongomock://", "t", client=client), None)
    else:
        import pymongo

        cfg = StoreConfig(backend="mongodb", uri=MONGO_URI, database=f"saecli_test_{uuid.uuid4().hex[:12]}")
        yield Backend("mongodb", lambda: open_store(cfg), cfg)
        with pymongo.MongoClient(MONGO_URI) as client:
            client.drop_database(cfg.database)


@pytest.fixture
def store(backend):
    with backend.open() as s:
        s.put_sae("sae-a", "s1", path="/runs/a", cfg={"kind": "sae", "d_sae": 8}, model_name="m", dataset_name="d")
        yield s


def feature(i: int, act_times: int, max_act: float, rng: np.random.Generator | None = None) -> dict:
    """A feature record shaped like the analysis helper's."""
    rng = rng or np.random.default_rng(i)
    return {
        "index": i,
        "act_times": act_times,
        "n_analyzed_tokens": 1000,
        "max_act": max_act,
        "histogram": {"edges": [0.0, 0.5, 1.0], "counts": [act_times, 1]},
        "samplings": [
            {
                "name": "top",
                "tokens": rng.integers(0, 50, (3, 5), dtype=np.int32),
                "acts": rng.random((3, 5), dtype=np.float32).astype(np.float16),
                "doc": np.arange(3, dtype=np.int64),
                "pos": np.zeros(3, dtype=np.int64),
            }
        ],
    }


def indices(features) -> list[int]:
    return [f["index"] for f in features]


# dictionaries, models, datasets


def test_upserts_of_models_datasets_and_dictionaries(store):
    store.put_model("m", {"name": "gpt2", "layers": 4})
    store.put_model("m", {"name": "gpt2", "layers": 12})
    store.put_dataset("d", {"path": "wiki", "split": np.str_("train")})
    assert store.get_model("m") == {"name": "gpt2", "layers": 12}
    assert store.get_dataset("d") == {"path": "wiki", "split": "train"}
    assert store.get_model("nope") is None

    store.update_sae_metrics("sae-a", "s1", {"mse": 0.5, "l0": np.float32(12.0)})
    store.update_sae_metrics("sae-a", "s1", {"mse": 0.25})
    # put again without metrics: a new path and cfg, the eval metrics kept
    store.put_sae("sae-a", "s1", path="/runs/a2", cfg={"kind": "sae", "d_sae": 16}, model_name="m", dataset_name=None)
    got = store.get_sae("sae-a", "s1")
    assert (got["path"], got["cfg"], got["dataset_name"]) == ("/runs/a2", {"kind": "sae", "d_sae": 16}, None)
    assert got["metrics"] == {"mse": 0.25, "l0": 12.0}
    store.put_sae("sae-a", "s1", path="/runs/a2", cfg={}, model_name="m", dataset_name=None, metrics={"x": 1})
    assert store.get_sae("sae-a", "s1")["metrics"] == {"x": 1}

    store.put_sae("sae-b", "s0", path="/b", cfg={}, model_name=None, dataset_name=None)
    store.put_sae("sae-0", "s1", path="/0", cfg={}, model_name=None, dataset_name=None)
    assert [(s["series"], s["name"]) for s in store.list_saes()] == [("s0", "sae-b"), ("s1", "sae-0"), ("s1", "sae-a")]
    assert [s["name"] for s in store.list_saes("s1")] == ["sae-0", "sae-a"]
    assert store.get_sae("sae-a", "other") is None
    with pytest.raises(RunError, match="not in the"):
        store.update_sae_metrics("ghost", "s1", {"mse": 1.0})


def test_configs_must_be_plain_json(store):
    with pytest.raises(TypeError, match="arrays are not allowed"):
        store.put_model("m", {"w": np.zeros(3)})


# features: arrays, ordering, merging


def test_arrays_come_back_with_their_dtype_and_shape(store):
    f = feature(3, act_times=7, max_act=np.float32(2.5))
    f["extras"] = {
        "mask": np.array([True, False]),
        "scalar": np.array(4.0),
        "empty": np.zeros((0, 4), np.float32),
        "count": np.int64(9),
        "pair": (1, 2),
    }
    meta = {"total_analyzing_tokens": 1000, "hist_edges": np.linspace(0, 1, 5, dtype=np.float64)}
    assert store.replace_analysis("sae-a", "s1", "default", [f], meta) == 1

    got = store.get_feature("sae-a", "s1", 3)
    assert got["act_times"] == 7 and got["max_act"] == 2.5 and got["histogram"] == f["histogram"]
    for key in ("tokens", "acts", "doc", "pos"):
        want, back = f["samplings"][0][key], got["samplings"][0][key]
        assert isinstance(back, np.ndarray) and back.dtype == want.dtype and back.shape == want.shape
        np.testing.assert_array_equal(back, want)
    ex = got["extras"]
    assert ex["mask"].dtype == np.bool_ and ex["mask"].tolist() == [True, False]
    assert ex["scalar"].shape == () and ex["scalar"] == 4.0
    assert ex["empty"].shape == (0, 4) and ex["empty"].dtype == np.float32
    assert ex["count"] == 9 and ex["pair"] == [1, 2]

    a = store.get_analysis("sae-a", "s1", "default")
    assert a["n_features"] == 1 and a["created_at"] <= time.time()
    assert a["meta"]["total_analyzing_tokens"] == 1000 == a["total_analyzing_tokens"]
    np.testing.assert_array_equal(a["meta"]["hist_edges"], meta["hist_edges"])


def test_large_arrays_round_trip(store):
    """Over 8 MB in one record: MongoDB moves it to GridFS, SQLite keeps it in the BLOB."""
    big = np.arange(9 * 2**20 // 4, dtype=np.float32).reshape(-1, 1024)
    store.replace_analysis("sae-a", "s1", "default", [{"index": 0, "big": big, "small": big[:2]}], {})
    got = store.get_feature("sae-a", "s1", 0)
    np.testing.assert_array_equal(got["big"], big)
    np.testing.assert_array_equal(got["small"], big[:2])
    store.replace_analysis("sae-a", "s1", "default", [{"index": 0, "big": big[:1]}], {})  # old file dropped
    assert store.get_feature("sae-a", "s1", 0)["big"].shape == (1, 1024)


def test_iter_features_sorts_limits_and_breaks_ties_by_index(store):
    stats = {0: (5, 1.0), 1: (9, 0.5), 2: (5, 3.0), 3: (0, 0.0), 4: (9, 2.0)}
    store.replace_analysis("sae-a", "s1", "default", (feature(i, *stats[i]) for i in [4, 2, 0, 3, 1]), {})

    assert indices(store.iter_features("sae-a", "s1")) == [0, 1, 2, 3, 4]
    assert indices(store.iter_features("sae-a", "s1", order_by="index", descending=True, limit=2)) == [4, 3]
    assert indices(store.iter_features("sae-a", "s1", order_by="act_times", descending=True)) == [1, 4, 0, 2, 3]
    assert indices(store.iter_features("sae-a", "s1", order_by="act_times")) == [3, 0, 2, 1, 4]
    assert indices(store.iter_features("sae-a", "s1", order_by="max_act", descending=True, limit=3)) == [2, 4, 0]
    assert indices(store.iter_features("sae-a", "s1", order_by="max_act", limit=0)) == []
    assert list(store.iter_features("sae-a", "s1", "other-analysis")) == []
    with pytest.raises(UsageError, match="act_times"):
        store.iter_features("sae-a", "s1", order_by="density")


def test_logits_and_interpretation_are_merged_into_features(store):
    store.replace_analysis("sae-a", "s1", "default", [feature(i, i, float(i)) for i in range(3)], {})
    top = {"top_positive": {"token": ["a", "b"], "logit": np.array([2.0, 1.0], np.float32)}}
    store.put_logits("sae-a", "s1", ((i, top) for i in range(5)))
    store.put_logits("sae-a", "s1", [(1, {"top_positive": {"token": ["z"], "logit": [9.0]}})])  # replaces
    store.put_interpretation("sae-a", "s1", 2, {"explanation": "commas", "score": 0.8})

    f0 = store.get_feature("sae-a", "s1", 0)
    assert f0["act_times"] == 0 and "interpretation" not in f0
    np.testing.assert_array_equal(f0["logits"]["top_positive"]["logit"], [2.0, 1.0])
    assert store.get_feature("sae-a", "s1", 1)["logits"] == {"top_positive": {"token": ["z"], "logit": [9.0]}}
    assert store.get_feature("sae-a", "s1", 2)["interpretation"] == {"explanation": "commas", "score": 0.8}
    # a feature outside the analysis still has its DLA; one with nothing is None
    assert store.get_feature("sae-a", "s1", 4)["index"] == 4 and "logits" in store.get_feature("sae-a", "s1", 4)
    assert store.get_feature("sae-a", "s1", 7) is None
    assert store.get_feature("ghost", "s1", 0) is None

    listed = list(store.iter_features("sae-a", "s1", order_by="act_times", descending=True))
    assert indices(listed) == [2, 1, 0]
    assert listed[0]["interpretation"]["explanation"] == "commas" and listed[1]["logits"]["top_positive"]["token"] == [
        "z"
    ]
    # a new analysis keeps the DLA and interpretations (they belong to the dictionary)
    store.replace_analysis("sae-a", "s1", "default", [feature(2, 1, 1.0)], {})
    assert store.get_feature("sae-a", "s1", 2)["interpretation"]["score"] == 0.8


def test_writes_for_an_unknown_dictionary_fail_clearly(store):
    with pytest.raises(RunError, match="put_sae"):
        store.replace_analysis("ghost", "s1", "default", [feature(0, 1, 1.0)], {})
    with pytest.raises(RunError, match="put_sae"):
        store.put_logits("ghost", "s1", [(0, {"x": 1})])
    with pytest.raises(ValueError, match="reserved"):
        store.replace_analysis("sae-a", "s1", "default", [{"index": 0, "version": 2}], {})


# atomic replace


def test_a_failed_replace_leaves_the_previous_analysis_intact(backend, store):
    store.replace_analysis("sae-a", "s1", "default", [feature(i, 10 + i, 1.0) for i in range(3)], {"run": 1})
    seen_by_reader = []

    def broken():
        for i in range(60):  # three write batches go to the store before the failure
            yield feature(i, 100, 9.0)
            if i == 50:
                with backend.open() as reader:  # another connection, while the writer is half way
                    seen_by_reader.append(reader.get_analysis("sae-a", "s1", "default")["n_features"])
                    seen_by_reader.append(indices(reader.iter_features("sae-a", "s1")))
        raise RuntimeError("analysis crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        store.replace_analysis("sae-a", "s1", "default", broken(), {"run": 2})
    assert seen_by_reader == [3, [0, 1, 2]]
    assert store.get_analysis("sae-a", "s1", "default")["meta"] == {"run": 1}
    assert [f["act_times"] for f in store.iter_features("sae-a", "s1")] == [10, 11, 12]
    assert store.get_feature("sae-a", "s1", 40) is None

    with pytest.raises(ValueError, match="same index"):
        store.replace_analysis("sae-a", "s1", "default", [feature(i % 30, 1, 1.0) for i in range(40)], {})
    assert store.get_analysis("sae-a", "s1", "default")["n_features"] == 3

    # a successful replace swaps the whole set: features absent from it are gone
    assert store.replace_analysis("sae-a", "s1", "default", [feature(7, 1, 1.0)], {"run": 3}) == 1
    assert indices(store.iter_features("sae-a", "s1")) == [7]
    assert store.get_analysis("sae-a", "s1", "default")["meta"] == {"run": 3}


def test_analyses_of_one_dictionary_are_independent(store):
    store.replace_analysis("sae-a", "s1", "default", [feature(0, 1, 1.0)], {})
    store.replace_analysis("sae-a", "s1", "wide", [feature(i, 1, 1.0) for i in range(4)], {})
    store.replace_analysis("sae-a", "s1", "default", [feature(1, 1, 1.0)], {})
    assert indices(store.iter_features("sae-a", "s1", "wide")) == [0, 1, 2, 3]
    assert indices(store.iter_features("sae-a", "s1")) == [1]
    assert store.get_feature("sae-a", "s1", 3, analysis="wide")["index"] == 3


def test_overlapping_replaces_keep_the_one_started_last(backend, store):
    def older():
        for i in range(30):
            yield feature(i, 1, 1.0)
            if i == 20:  # a newer replace starts and finishes meanwhile
                with backend.open() as other:
                    other.replace_analysis("sae-a", "s1", "default", [feature(9, 2, 2.0)], {"run": "newer"})

    with pytest.raises(RunError, match="newer"):
        store.replace_analysis("sae-a", "s1", "default", older(), {"run": "older"})
    assert store.get_analysis("sae-a", "s1", "default")["meta"] == {"run": "newer"}
    assert indices(store.iter_features("sae-a", "s1")) == [9]


KILLED_WRITER = """
import json, sys, time
from saecli.config.run import StoreConfig
from saecli.store import open_store
store = open_store(StoreConfig(**json.loads(sys.argv[1])))
def features():
    for i in range(1000):
        yield {"index": i, "act_times": 1, "max_act": 1.0, "pad": "x" * 100}
        if i == 700:
            print("half way", flush=True)
            time.sleep(60)
store.replace_analysis("sae-a", "s1", "default", features(), {"run": "killed"})
"""


def test_a_killed_writer_leaves_the_previous_analysis_intact(backend, store):
    if backend.cfg is None:
        pytest.skip("needs a store another process can open")
    store.replace_analysis("sae-a", "s1", "default", [feature(i, 1, 1.0) for i in range(3)], {"run": 1})
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, json.dumps(asdict(backend.cfg))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "half way"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    if backend.name == "sqlite":  # the dead writer committed 512 features under an invisible row
        with sqlite3.connect(backend.cfg.path) as db:
            assert db.execute("SELECT count(*) FROM features").fetchone()[0] == 3 + 512
    with backend.open() as fresh:
        assert fresh.get_analysis("sae-a", "s1", "default")["meta"] == {"run": 1}
        assert indices(fresh.iter_features("sae-a", "s1")) == [0, 1, 2]
        fresh.replace_analysis("sae-a", "s1", "default", [feature(5, 1, 1.0)], {"run": 2})
        assert indices(fresh.iter_features("sae-a", "s1")) == [5]
    if backend.name == "sqlite":  # the dead writer's invisible rows went with the next replace
        with sqlite3.connect(backend.cfg.path) as db:
            assert db.execute("SELECT count(*) FROM analyses").fetchone()[0] == 1
            assert db.execute("SELECT count(*) FROM features").fetchone()[0] == 1


# removal


def test_remove_sae_removes_everything_it_owns(store):
    store.put_sae("sae-b", "s1", path="/b", cfg={}, model_name=None, dataset_name=None)
    for name in ("sae-a", "sae-b"):
        store.replace_analysis(name, "s1", "default", [feature(i, 1, 1.0) for i in range(3)], {})
        store.put_logits(name, "s1", [(0, {"tokens": np.arange(3)})])
        store.put_interpretation(name, "s1", 1, {"explanation": "x"})
    store.remove_sae("sae-a", "s1")
    assert store.get_sae("sae-a", "s1") is None
    assert store.get_analysis("sae-a", "s1", "default") is None
    assert store.get_feature("sae-a", "s1", 0) is None and store.get_feature("sae-a", "s1", 1) is None
    assert list(store.iter_features("sae-a", "s1")) == []
    # a dictionary of the same name recorded again starts empty; the other one is untouched
    store.put_sae("sae-a", "s1", path="/a", cfg={}, model_name=None, dataset_name=None)
    assert store.get_feature("sae-a", "s1", 0) is None
    assert indices(store.iter_features("sae-b", "s1")) == [0, 1, 2]
    assert store.get_feature("sae-b", "s1", 1)["interpretation"] == {"explanation": "x"}
    store.remove_sae("never-there", "s1")  # no error


# backend specifics


def test_unreachable_mongodb_is_a_clear_error_within_seconds():
    start = time.perf_counter()
    with pytest.raises(RunError, match=r"cannot reach MongoDB at mongodb://127\.0\.0\.1:1 .*sqlite"):
        open_store(StoreConfig(backend="mongodb", uri="mongodb://127.0.0.1:1", timeout_s=0.5))
    assert time.perf_counter() - start < 3


def test_sqlite_file_has_the_schema_wal_and_sort_indexes(tmp_path):
    with open_store(StoreConfig(path="sub/results.db"), base=tmp_path) as s:
        s.put_sae("x", "default", path="/x", cfg={}, model_name=None, dataset_name=None)
        s.replace_analysis("x", "default", "default", [feature(i, i, 1.0) for i in range(5)], {})
    with sqlite3.connect(tmp_path / "sub" / "results.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"models", "datasets", "saes", "analyses", "features", "logits", "interpretations"} <= tables
        plan = " ".join(
            r[-1]
            for r in db.execute(
                "EXPLAIN QUERY PLAN SELECT idx FROM features WHERE analysis_id = 1 ORDER BY act_times DESC LIMIT 3"
            )
        )
        assert "features_act_times" in plan and "TEMP B-TREE" not in plan


def test_sqlite_store_is_shared_by_processes(tmp_path):
    path = tmp_path / "shared.db"
    code = (
        "import sys\nfrom saecli.config.run import StoreConfig\nfrom saecli.store import open_store\n"
        "s = open_store(StoreConfig(path=sys.argv[1]))\n"
        "for i in range(60):\n"
        "    s.put_sae(f'{sys.argv[2]}-{i}', 'p', path='/x', cfg={}, model_name=None, dataset_name=None)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), tag], stderr=subprocess.PIPE, text=True)
        for tag in ("a", "b")
    ]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    with open_store(StoreConfig(path=str(path))) as s:
        assert len(s.list_saes("p")) == 120


def test_sqlite_path_that_is_a_folder_is_a_run_error(tmp_path):
    with pytest.raises(RunError, match="is a folder"):
        open_store(StoreConfig(path=str(tmp_path)))


def test_null_store_records_nothing_but_runs_the_iterator():
    s = open_store(StoreConfig(backend="none"))
    assert isinstance(s, NullStore)
    s.put_sae("x", "default", path="/x", cfg={}, model_name=None, dataset_name=None)
    assert s.replace_analysis("x", "default", "default", (feature(i, 1, 1.0) for i in range(4)), {}) == 4
    assert s.get_sae("x") is None and s.list_saes() == [] and list(s.iter_features("x", "default")) == []


def test_sqlite_array_frames_are_npy_files(tmp_path):
    """Each array in a BLOB is a plain .npy frame: other tools can read the file with np.load."""
    import io
    import struct

    with open_store(StoreConfig(path=str(tmp_path / "s.db"))) as s:
        s.put_sae("x", "default", path="/x", cfg={}, model_name=None, dataset_name=None)
        s.replace_analysis(
            "x", "default", "default", [{"index": 0, "a": np.arange(6, dtype=np.int16).reshape(2, 3)}], {}
        )
    with sqlite3.connect(tmp_path / "s.db") as db:
        doc, blob = db.execute("SELECT doc, arrays FROM features").fetchone()
    assert json.loads(doc)["a"] == {"__ndarray__": 0}
    (n,) = struct.unpack_from("<Q", blob)
    assert len(blob) == 8 + n
    np.testing.assert_array_equal(np.load(io.BytesIO(blob[8:])), np.arange(6, dtype=np.int16).reshape(2, 3))
