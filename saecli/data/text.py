"""Text sources: (document index, text) pairs from a `datasets` source or the built-in offline text.

Every source is read in a fixed order and numbered from 0, so a document index means the same text on
every machine. `skip_documents`/`max_documents` select a range of those indices, and shards take the
documents whose index is `shard_index` modulo `n_shards` (disjoint, deterministic, no coordination).

The built-in source `builtin:python-docs` needs no download: the Python documentation topics that
ship with the interpreter (`pydoc_data.topics`, ~110k SmolLM2 tokens), then the docstrings of the
standard library read with `ast` from its source files (nothing is imported, ~340k tokens), then the
source files themselves when a run asks for more.
"""

from __future__ import annotations

import ast
import functools
import itertools
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saecli.config.dataset import DatasetConfig
from saecli.errors import UsageError

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset


BUILTIN = "builtin:python-docs"
BUILTIN_SOURCES = (BUILTIN,)

# Parts of the standard library that distributions ship separately or that hold tests, generated or
# machine-specific files: leaving them out keeps the built-in text the same on every machine.
_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "venv",
    "distutils",
    "site-packages",
    "dist-packages",
    "lib-dynload",
    "__pycache__",
    "__phello__",
}
_SKIP_FILES = {"turtle.py", "sitecustomize.py", "usercustomize.py", "__phello__.foo.py"}
_LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def iter_documents(cfg: DatasetConfig, shard_index: int = 0, n_shards: int = 1) -> Iterator[tuple[int, str]]:
    """Yield (document index, text) for the documents of `cfg` that fall in shard `shard_index`."""
    if not 0 <= shard_index < n_shards:
        raise UsageError(f"shard {shard_index} is outside [0, {n_shards})")
    start = cfg.skip_documents
    stop = None if cfg.max_documents is None else start + cfg.max_documents
    for index, text in itertools.islice(_numbered(cfg, start), 0, None if stop is None else stop - start):
        if index % n_shards == shard_index:
            yield index, text


def check_dataset(cfg: DatasetConfig) -> None:
    """Fail fast (before a model loads) on a missing local file or an unknown built-in text."""
    if cfg.path.startswith("imported:"):  # see saecli.interop.activations
        raise UsageError(
            f"dataset.path is {cfg.path!r}: the run trained on imported activations and there is no "
            "text to read; evaluate on an activation cache of held-out tokens (eval.cache_dir), or "
            "set dataset.path to the text the activations came from"
        )
    if cfg.path.startswith("builtin:"):
        if cfg.path != BUILTIN:
            raise UsageError(
                f"unknown built-in text {cfg.path!r} (key `dataset.path`); choose from {', '.join(BUILTIN_SOURCES)}"
            )
        return
    path = Path(cfg.path).expanduser()
    looks_local = cfg.path.startswith((".", "/", "~")) or path.suffix.lower() in _LOCAL_SUFFIXES
    if looks_local and not path.exists():
        raise UsageError(f"dataset file or folder not found: {cfg.path} (key `dataset.path`)")


def _numbered(cfg: DatasetConfig, start: int) -> Iterator[tuple[int, str]]:
    check_dataset(cfg)
    if cfg.path.startswith("builtin:"):
        return itertools.islice(enumerate(builtin_documents()), start, None)
    return _dataset_documents(cfg, start)


# --------------------------------------------------------------------------- the built-in text


def builtin_documents() -> Iterator[str]:
    """The built-in text in its fixed order: docs topics, then stdlib docstrings, then stdlib source."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    for key in sorted(topics):
        yield topics[key]
    files = stdlib_files()
    for path in files:
        doc = module_docstrings(path)
        if doc:
            yield doc
    for path in files:
        text = _read(path)
        if text.strip():
            yield text


def stdlib_files() -> list[Path]:
    """Python source files of the standard library, in sorted relative-path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in files:
            if name.endswith(".py") and name not in _SKIP_FILES and not name.startswith("_sysconfigdata"):
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path))
    return [p for _, p in sorted(found)]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


@functools.cache
def module_docstrings(path: Path) -> str:
    """One document per module: its docstring and every class/function docstring, in source order.

    Remembered per file (the parse is the slow part of the built-in text; ~1.5 MB in all), so live
    streams that re-read the text to resume or to start an epoch do not parse it again.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    try:
        tree = ast.parse(_read(path))
    except (SyntaxError, ValueError):
        return ""
    parts: list[str] = []
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")
    _collect(tree, "", parts)
    if not parts:
        return ""
    if not doc:
        parts.insert(0, f"Module {module}")
    return "\n\n".join(parts) + "\n"


def _collect(node: ast.AST, prefix: str, parts: list[str]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{child.name}"
            doc = ast.get_docstring(child, clean=True)
            if doc:
                kind = "class" if isinstance(child, ast.ClassDef) else "def"
                parts.append(f"{kind} {name}\n{doc}")
            _collect(child, name + ".", parts)
        elif isinstance(child, ast.stmt):
            _collect(child, prefix, parts)


# --------------------------------------------------------------------------- `datasets` sources


def _dataset_documents(cfg: DatasetConfig, start: int) -> Iterator[tuple[int, str]]:
    ds = load_text_dataset(cfg)
    column = cfg.text_column
    names = getattr(ds, "column_names", None)
    if names is not None and column not in names:
        raise UsageError(
            f"dataset {cfg.path!r} has no column {column!r} (key `dataset.text_column`); its columns: {', '.join(names)}"
        )
    streaming = not hasattr(ds, "__len__")
    if start:
        ds = ds.skip(start) if streaming else ds.select(range(min(start, len(ds)), len(ds)))
    for index, row in enumerate(ds, start):
        if column not in row:
            raise UsageError(
                f"dataset {cfg.path!r} has no column {column!r} (key `dataset.text_column`); "
                f"its columns: {', '.join(row)}"
            )
        text = row[column]
        yield index, text if isinstance(text, str) else ("" if text is None else str(text))


def load_text_dataset(cfg: DatasetConfig) -> Dataset | IterableDataset:
    """`datasets.load_dataset` for a hub name, a local file/folder, or explicit `data_files`."""
    import datasets

    path = Path(cfg.path).expanduser()
    kwargs: dict[str, Any] = {"split": cfg.split}
    local = path.exists()
    looks_local = local or cfg.path.startswith((".", "/", "~")) or path.suffix in _LOCAL_SUFFIXES
    if looks_local and not local:
        raise UsageError(f"dataset file or folder not found: {cfg.path} (key `dataset.path`)")
    streaming = cfg.streaming if cfg.streaming is not None else not local
    data_files = list(cfg.data_files) if cfg.data_files else None
    if local and path.is_file():
        builder = _LOCAL_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise UsageError(
                f"cannot read {cfg.path} (key `dataset.path`): expected one of {', '.join(sorted(_LOCAL_SUFFIXES))}"
            )
        args: tuple = (builder,)
        data_files = [str(path)]
    elif local:
        args = (str(path),) if data_files is None else (_builder_of(data_files, cfg),)
        if data_files is not None:
            data_files = [str(path / f) if not Path(f).is_absolute() else f for f in data_files]
    else:
        args = (cfg.path,)
        if cfg.name:
            args = (cfg.path, cfg.name)
    if data_files is not None:
        missing = [f for f in data_files if "*" not in f and "://" not in f and local and not Path(f).exists()]
        if missing:
            raise UsageError(f"data file not found: {missing[0]} (key `dataset.data_files`)")
        kwargs["data_files"] = data_files
    try:
        return datasets.load_dataset(*args, streaming=streaming, **kwargs)
    except FileNotFoundError as exc:
        raise UsageError(f"cannot load dataset {cfg.path!r} (key `dataset.path`): {exc}") from None
    except ValueError as exc:
        raise UsageError(f"cannot load dataset {cfg.path!r} (key `dataset.path` / `dataset.split`): {exc}") from None
    except ConnectionError as exc:
        raise UsageError(f"cannot reach dataset {cfg.path!r} (key `dataset.path`): {exc}") from None


def _builder_of(files: list[str], cfg: DatasetConfig) -> str:
    suffixes = {_LOCAL_SUFFIXES.get(Path(f).suffix.lower()) for f in files}
    if len(suffixes) != 1 or None in suffixes:
        raise UsageError(f"dataset.data_files must share one of {', '.join(sorted(_LOCAL_SUFFIXES))}, found {files}")
    (builder,) = suffixes
    assert builder is not None  # excluded just above
    return builder
