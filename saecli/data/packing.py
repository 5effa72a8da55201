"""Tokenise and pack documents into windows, with numpy only (no torch: a tokeniser process starts fast).

See tokens.py for the packing rules; this module holds the part that runs wherever the text is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


Encode = Callable[[list[str]], list[list[int]]]
Windows = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens int64 [T], doc int64 [T], pos int32 [T]


class FastEncoder:
    """A Hugging Face fast tokenizer's Rust backend: picklable, and it tokenises in parallel."""

    def __init__(self, backend: Any):
        self.backend = backend

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]


class CallEncoder:
    """Any tokenizer called like a Hugging Face one."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def encoder_for(tokenizer: PreTrainedTokenizerBase) -> Encode:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return FastEncoder(backend)
    return CallEncoder(tokenizer)


class WindowPacker:
    """Documents → windows of `context_size` tokens (BOS first when `prepend_bos`), with (doc, pos)."""

    def __init__(
        self,
        encode: Encode,
        context_size: int,
        *,
        prepend_bos: bool,
        bos_id: int | None,
        sep_id: int | None,
        doc_batch: int = 64,
    ):
        self.encode = encode
        self.context_size = context_size
        self.prepend_bos = prepend_bos
        self.bos_id = bos_id
        self.sep_id = sep_id
        self.doc_batch = doc_batch

    def _tokenised(self, documents: Iterable[tuple[int, str]]) -> Iterator[tuple[int, list[int]]]:
        batch: list[tuple[int, str]] = []
        for item in documents:
            batch.append(item)
            if len(batch) >= self.doc_batch:
                yield from self._flush(batch)
                batch = []
        if batch:
            yield from self._flush(batch)

    def _flush(self, batch: list[tuple[int, str]]) -> Iterator[tuple[int, list[int]]]:
        for (index, _), toks in zip(batch, self.encode([t for _, t in batch])):
            if toks:
                yield index, toks

    def windows(self, documents: Iterable[tuple[int, str]]) -> Iterator[Windows]:
        """Yield (tokens, doc, pos) per window, in order; a trailing partial window is dropped."""
        body = self.context_size - (1 if self.prepend_bos else 0)
        parts: list[Windows] = []
        held = 0
        for index, toks in self._tokenised(documents):
            n = len(toks) + (1 if self.sep_id is not None else 0)
            tokens = np.empty(n, dtype=np.int64)
            tokens[: len(toks)] = toks
            if self.sep_id is not None:
                tokens[-1] = self.sep_id
            parts.append((tokens, np.full(n, index, dtype=np.int64), np.arange(n, dtype=np.int32)))
            held += n
            while held >= body:
                tokens, doc, pos = _take(parts, body)
                held -= body
                if self.prepend_bos:
                    tokens = np.concatenate((np.array([self.bos_id], dtype=tokens.dtype), tokens))
                    doc = np.concatenate((doc[:1], doc))
                    pos = np.concatenate((np.array([-1], dtype=np.int32), pos))
                yield tokens, doc, pos

    def batches(
        self, documents: Iterable[tuple[int, str]], batch_size: int, skip: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
        """(tokens [B, T], doc [B, T], pos [B, T], index of the first window) after skipping `skip` windows."""
        buf: list[Windows] = []
        first = skip
        for i, window in enumerate(self.windows(documents)):
            if i < skip:
                continue
            buf.append(window)
            if len(buf) == batch_size:
                yield _stack(buf, first)
                first += len(buf)
                buf = []
        if buf:
            yield _stack(buf, first)


def _stack(windows: list[Windows], first: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    return (
        np.stack([w[0] for w in windows]),
        np.stack([w[1] for w in windows]),
        np.stack([w[2] for w in windows]),
        first,
    )


def _take(parts: list[Windows], n: int) -> Windows:
    """Remove and return the first n entries of the queued document pieces."""
    out: list[Windows] = []
    need = n
    while need:
        tokens, doc, pos = parts[0]
        if len(tokens) <= need:
            out.append(parts.pop(0))
            need -= len(tokens)
        else:
            out.append((tokens[:need], doc[:need], pos[:need]))
            parts[0] = (tokens[need:], doc[need:], pos[need:])
            need = 0
    if len(out) == 1:
        return out[0]
    return tuple(np.concatenate([o[i] for o in out]) for i in range(3))  # type: ignore[return-value]
