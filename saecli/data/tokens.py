"""Documents → fixed-size token windows ("contexts") that keep where every token came from.

Documents are tokenised without special tokens and concatenated, each followed by a separator (the
tokenizer's EOS, else its BOS); the stream is cut into windows of `context_size` tokens, each starting
with BOS when `prepend_bos`. Every token carries (document index, position in that document): the BOS
of a window gets the document of the token after it and position -1, a separator gets the position
just past its document's last token. `mask` is False at ignored token ids (by default the tokenizer's
special tokens, BOS included): those positions are dropped from token streams, but contexts keep them
so that tokens, activations and (doc, pos) stay aligned. A trailing partial window is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from saecli.errors import UsageError


@dataclass
class Contexts:
    """B packed windows: tokens/doc/pos/mask are [B, T] (int64/int64/int32/bool); `first` numbers them."""

    tokens: torch.Tensor
    doc: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    first: int = 0

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def kept(self) -> torch.Tensor:
        """Flat indices (into B·T) of the positions that count."""
        return self.mask.reshape(-1).nonzero().squeeze(1)


class Packer:
    """Tokenise documents and pack them into windows; `windows()` yields one (tokens, doc, pos) at a time."""

    def __init__(self, tokenizer: Any, context_size: int, *, prepend_bos: bool, bos_id: int | None,
                 sep_id: int | None, ignore_ids: Sequence[int], doc_batch: int = 64):
        if prepend_bos and bos_id is None:
            raise UsageError("prepend_bos needs a BOS token: set model.bos_token (e.g. '<|im_start|>')")
        if context_size < 2:
            raise UsageError(f"activations.context_size must be >= 2, found {context_size}")
        self.tokenizer = tokenizer
        self.context_size = context_size
        self.prepend_bos = prepend_bos
        self.bos_id = bos_id
        self.sep_id = sep_id
        self.ignore_ids = sorted({int(i) for i in ignore_ids})
        self.doc_batch = doc_batch
        self._ignore = torch.tensor(self.ignore_ids, dtype=torch.int64)

    def _tokenised(self, documents: Iterable[tuple[int, str]]) -> Iterator[tuple[int, list[int]]]:
        batch: list[tuple[int, str]] = []

        def flush() -> Iterator[tuple[int, list[int]]]:
            ids = self.tokenizer([t for _, t in batch], add_special_tokens=False, verbose=False)["input_ids"]
            for (index, _), toks in zip(batch, ids):
                if toks:
                    yield index, toks
            batch.clear()

        for item in documents:
            batch.append(item)
            if len(batch) >= self.doc_batch:
                yield from flush()
        if batch:
            yield from flush()

    def windows(self, documents: Iterable[tuple[int, str]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (tokens int64 [T], doc int64 [T], pos int32 [T]) per window, in order."""
        body = self.context_size - (1 if self.prepend_bos else 0)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
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
                    tokens = np.concatenate(([self.bos_id], tokens))
                    doc = np.concatenate((doc[:1], doc))
                    pos = np.concatenate((np.array([-1], dtype=np.int32), pos))
                yield tokens, doc, pos

    def contexts(self, documents: Iterable[tuple[int, str]], batch_size: int, *, skip: int = 0) -> Iterator[Contexts]:
        """Batches of `batch_size` windows (the last one may be smaller), after skipping `skip` windows."""
        buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        first = skip
        for i, window in enumerate(self.windows(documents)):
            if i < skip:
                continue
            buf.append(window)
            if len(buf) == batch_size:
                yield self._stack(buf, first)
                first += len(buf)
                buf = []
        if buf:
            yield self._stack(buf, first)

    def _stack(self, windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], first: int) -> Contexts:
        tokens = torch.from_numpy(np.stack([w[0] for w in windows]))
        doc = torch.from_numpy(np.stack([w[1] for w in windows]))
        pos = torch.from_numpy(np.stack([w[2] for w in windows]))
        return Contexts(tokens, doc, pos, self.mask(tokens), first)

    def mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """True where a token counts (its id is not ignored)."""
        if not self.ignore_ids:
            return torch.ones_like(tokens, dtype=torch.bool)
        return ~torch.isin(tokens, self._ignore)


def _take(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remove and return the first n entries of the queued document pieces."""
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
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


def separator_id(tokenizer: Any, bos_id: int | None) -> int | None:
    """The token put between documents: EOS when the tokenizer has one, else BOS."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else bos_id


def packer_for(lm: Any, acts_cfg: Any, model_cfg: Any = None) -> Packer:
    """The packer a language model and an [activations] section describe.

    Documents are tokenised without special tokens, so BOS is ours to add: it is prepended when
    `model.prepend_bos` says so, else whenever the model expects one (its tokenizer would add it).
    """
    ignore = acts_cfg.ignore_token_ids
    if ignore is None:
        ignore = default_ignore_ids(lm)
    explicit = getattr(model_cfg, "prepend_bos", None)
    prepend = explicit if explicit is not None else bool(lm.prepend_bos or getattr(lm, "tokenizer_adds_bos", False))
    return Packer(
        lm.tokenizer, acts_cfg.context_size, prepend_bos=prepend, bos_id=lm.bos_token_id,
        sep_id=separator_id(lm.tokenizer, lm.bos_token_id), ignore_ids=ignore,
    )


def default_ignore_ids(lm: Any) -> list[int]:
    """The tokenizer's special token ids, BOS included."""
    ids = {int(i) for i in (getattr(lm, "special_token_ids", None) or [])}
    if lm.bos_token_id is not None:
        ids.add(int(lm.bos_token_id))
    return sorted(ids)
