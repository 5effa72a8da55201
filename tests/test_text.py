"""Text sources and packing: which documents, in which order, and where every token came from."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from saecli.config.dataset import DatasetConfig
from saecli.data.text import builtin_documents, iter_documents, module_docstrings, stdlib_files
from saecli.data.tokens import Packer
from saecli.errors import UsageError


def _digest(docs) -> str:
    h = hashlib.sha256()
    for index, text in docs:
        h.update(f"{index}\0{text}\0".encode())
    return h.hexdigest()


def test_builtin_text_is_deterministic_across_processes():
    cfg = DatasetConfig(max_documents=120)  # all 79 topics and the first docstring documents
    here = _digest(iter_documents(cfg))
    code = (
        "import hashlib; from saecli.config.dataset import DatasetConfig; from saecli.data.text import iter_documents\n"
        "h = hashlib.sha256()\n"
        "for i, t in iter_documents(DatasetConfig(max_documents=120)): h.update(f'{i}\\0{t}\\0'.encode())\n"
        "print(h.hexdigest())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    ).stdout.strip()
    assert here == other


def test_builtin_text_order_and_size():
    import pydoc_data.topics

    docs = builtin_documents()
    topics = pydoc_data.topics.topics
    first = [next(docs) for _ in range(len(topics))]
    assert first == [topics[k] for k in sorted(topics)]
    assert next(docs).startswith("Module ")  # then the standard library's docstrings
    files = stdlib_files()
    assert [p.as_posix() for p in files] == sorted(p.as_posix() for p in files) and len(files) > 300
    assert not any({"test", "tests", "idlelib", "site-packages"} & set(p.parts) for p in files)
    assert not any(p.name.startswith("_sysconfigdata") for p in files)  # machine-specific
    # ~110k SmolLM2 tokens of topics + ~340k of docstrings: at ~4.4 chars per token, well over 1.5M characters
    topic_chars = sum(len(t) for t in topics.values())
    doc_chars = sum(len(module_docstrings(p)) for p in files)
    assert topic_chars > 400_000 and doc_chars > 1_200_000


def test_module_docstrings_are_read_without_importing(tmp_path, monkeypatch):
    stdlib = tmp_path / "lib"
    (stdlib / "pkg").mkdir(parents=True)
    (stdlib / "pkg" / "mod.py").write_text(
        '"""Top."""\nraise SystemExit("imported!")\nclass A:\n    """Class A."""\n    def f(self):\n        """Method f."""\n'
        'if True:\n    def g():\n        """Nested under if."""\n'
    )
    monkeypatch.setattr("sysconfig.get_paths", lambda: {"stdlib": str(stdlib)})
    text = module_docstrings(stdlib / "pkg" / "mod.py")
    assert text == "Module pkg.mod\n\nTop.\n\nclass A\nClass A.\n\ndef A.f\nMethod f.\n\ndef g\nNested under if.\n"


def test_skip_max_and_shards_split_the_same_documents():
    cfg = DatasetConfig(skip_documents=10, max_documents=30)
    everything = list(iter_documents(cfg))
    assert [i for i, _ in everything] == list(range(10, 40))
    shards = [list(iter_documents(cfg, s, 3)) for s in range(3)]
    assert sorted(sum(shards, [])) == everything
    assert all(i % 3 == s for s, shard in enumerate(shards) for i, _ in shard)


def test_local_files(tmp_path):
    rows = [{"text": f"document number {i}", "other": i} for i in range(7)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(iter_documents(DatasetConfig(path=str(jsonl), skip_documents=2, max_documents=3))) == [
        (2, "document number 2"),
        (3, "document number 3"),
        (4, "document number 4"),
    ]

    import pandas as pd

    parquet = tmp_path / "folder" / "part.parquet"
    parquet.parent.mkdir()
    pd.DataFrame({"body": [r["text"] for r in rows]}).to_parquet(parquet)
    got = list(iter_documents(DatasetConfig(path=str(parquet.parent), text_column="body")))
    assert got == [(i, f"document number {i}") for i in range(7)]

    txt = tmp_path / "lines.txt"
    txt.write_text("first line\nsecond line\n")
    assert [t for _, t in iter_documents(DatasetConfig(path=str(txt), streaming=True))] == ["first line", "second line"]


def test_missing_file_and_column_name_the_key(tmp_path):
    with pytest.raises(UsageError, match="dataset.path"):
        list(iter_documents(DatasetConfig(path=str(tmp_path / "nope.jsonl"))))
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "x"}\n')
    with pytest.raises(UsageError, match=r"dataset.text_column.*body"):
        list(iter_documents(DatasetConfig(path=str(f))))
    with pytest.raises(UsageError, match="builtin:python-docs"):
        list(iter_documents(DatasetConfig(path="builtin:nothing")))


class CharTokenizer:
    """One token per character (id = ord), so expected windows can be written by hand."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        assert not add_special_tokens
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_packing_by_hand():
    packer = Packer(CharTokenizer(), 5, prepend_bos=True, bos_id=1, sep_id=0, ignore_ids=[0, 1])
    docs = [(7, "abc"), (8, ""), (9, "defgh")]
    windows = list(packer.windows(docs))
    # stream: a b c <sep> d e f g h <sep>; windows of BOS + 4 tokens; the partial tail is dropped
    assert [w[0].tolist() for w in windows] == [[1, 97, 98, 99, 0], [1, 100, 101, 102, 103]]
    assert [w[1].tolist() for w in windows] == [[7, 7, 7, 7, 7], [9, 9, 9, 9, 9]]
    assert [w[2].tolist() for w in windows] == [[-1, 0, 1, 2, 3], [-1, 0, 1, 2, 3]]
    batch = next(packer.contexts(docs, 2))
    assert batch.mask.tolist() == [[False, True, True, True, False], [False, True, True, True, True]]
    assert batch.kept().tolist() == [1, 2, 3, 6, 7, 8, 9]


def test_packing_alignment_on_real_tokenizer(tiny_llama):
    """(doc, pos) of every kept token points back at that token of that document."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = DatasetConfig(max_documents=40)
    docs = dict(iter_documents(cfg))
    packer = Packer(
        tok, 64, prepend_bos=True, bos_id=tok.bos_token_id, sep_id=tok.eos_token_id, ignore_ids=tok.all_special_ids
    )
    ids = {i: tok(t, add_special_tokens=False)["input_ids"] for i, t in docs.items()}
    n_windows = 0
    for ctx in packer.contexts(iter_documents(cfg), 8):
        assert ctx.tokens.shape[1] == 64 and (ctx.tokens[:, 0] == tok.bos_token_id).all()
        keep = ctx.mask
        for t, d, p in zip(ctx.tokens[keep].tolist(), ctx.doc[keep].tolist(), ctx.pos[keep].tolist()):
            assert ids[d][p] == t
        sep = ctx.tokens == tok.eos_token_id
        assert all(p == len(ids[d]) for d, p in zip(ctx.doc[sep].tolist(), ctx.pos[sep].tolist()))
        n_windows += len(ctx)
    assert n_windows == (sum(len(v) + 1 for v in ids.values())) // 63
    # skipping windows gives the same windows later on
    again = next(packer.contexts(iter_documents(cfg), 8, skip=5))
    ref = [c for c in packer.contexts(iter_documents(cfg), 1)][5:13]
    assert again.first == 5 and torch.equal(again.tokens, torch.cat([c.tokens for c in ref]))
