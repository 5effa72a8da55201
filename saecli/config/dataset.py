"""[dataset]: where the text comes from."""

from __future__ import annotations

from dataclasses import dataclass

from saecli.config.base import bad, opt


@dataclass
class DatasetConfig:
    path: str = opt(
        "builtin:python-docs",
        help="a `datasets` hub name, a local .jsonl/.json/.parquet/.txt file or folder, or "
        "'builtin:python-docs' (offline text on every machine)",
        stream=True,
    )
    name: str | None = opt(None, help="dataset configuration name (hub datasets)", stream=True)
    split: str = opt("train", help="split to read", stream=True)
    text_column: str = opt("text", help="column holding the text", stream=True)
    data_files: list[str] | None = opt(None, help="explicit data files (passed to datasets.load_dataset)", stream=True)
    streaming: bool | None = opt(
        None, help="stream instead of downloading (default: streaming for hub datasets)", stream=True
    )
    skip_documents: int = opt(0, help="skip this many documents first (e.g. to hold out text for eval)", stream=True)
    max_documents: int | None = opt(None, help="stop after this many documents", stream=True)

    def validate(self) -> None:
        if not self.path:
            raise bad("path", "must not be empty")
        if self.skip_documents < 0:
            raise bad("skip_documents", f"must be >= 0, found {self.skip_documents}")
