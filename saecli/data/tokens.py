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

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from saecli.data.packing import WindowPacker, encoder_for
from saecli.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from saecli.config.activations import ActivationsConfig
    from saecli.config.model import ModelConfig
    from saecli.lm.loading import LanguageModel


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
    """Tokenise and pack documents (packing.py does the numpy part) and mark the tokens that count."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        context_size: int,
        *,
        prepend_bos: bool,
        bos_id: int | None,
        sep_id: int | None,
        ignore_ids: Sequence[int],
        doc_batch: int = 64,
    ):
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
        self.windows_of = WindowPacker(
            encoder_for(tokenizer),
            context_size,
            prepend_bos=prepend_bos,
            bos_id=bos_id,
            sep_id=sep_id,
            doc_batch=doc_batch,
        )
        self._ignore = torch.tensor(self.ignore_ids, dtype=torch.int64)

    def windows(self, documents: Iterable[tuple[int, str]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (tokens int64 [T], doc int64 [T], pos int32 [T]) per window, in order."""
        return self.windows_of.windows(documents)

    def contexts(self, documents: Iterable[tuple[int, str]], batch_size: int, *, skip: int = 0) -> Iterator[Contexts]:
        """Batches of `batch_size` windows (the last one may be smaller), after skipping `skip` windows."""
        for batch in self.windows_of.batches(documents, batch_size, skip):
            yield self.to_contexts(batch)

    def to_contexts(self, batch: tuple[np.ndarray, np.ndarray, np.ndarray, int]) -> Contexts:
        tokens, doc, pos, first = batch
        t = torch.from_numpy(tokens)
        return Contexts(t, torch.from_numpy(doc), torch.from_numpy(pos), self.mask(t), first)

    def mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """True where a token counts (its id is not ignored)."""
        if not self.ignore_ids:
            return torch.ones_like(tokens, dtype=torch.bool)
        return ~torch.isin(tokens, self._ignore)


def separator_id(tokenizer: PreTrainedTokenizerBase, bos_id: int | None) -> int | None:
    """The token put between documents: EOS when the tokenizer has one, else BOS."""
    eos = tokenizer.eos_token_id
    return int(eos) if eos is not None else bos_id


def packer_for(lm: LanguageModel, acts_cfg: ActivationsConfig, model_cfg: ModelConfig | None = None) -> Packer:
    """The packer a language model and an [activations] section describe.

    Documents are tokenised without special tokens, so BOS is ours to add: it is prepended when
    `model.prepend_bos` says so, else whenever the model expects one (its tokenizer would add it).
    """
    ignore = acts_cfg.ignore_token_ids
    if ignore is None:
        ignore = default_ignore_ids(lm)
    explicit = model_cfg.prepend_bos if model_cfg is not None else None
    prepend = explicit if explicit is not None else bool(lm.prepend_bos or lm.tokenizer_adds_bos)
    if lm.tokenizer is None:
        raise UsageError(f"the model {lm.name} has no tokenizer: it cannot read text (give [model] one that has)")
    return Packer(
        lm.tokenizer,
        acts_cfg.context_size,
        prepend_bos=prepend,
        bos_id=lm.bos_token_id,
        sep_id=separator_id(lm.tokenizer, lm.bos_token_id),
        ignore_ids=ignore,
    )


def default_ignore_ids(lm: LanguageModel) -> list[int]:
    """The tokenizer's special token ids, BOS included."""
    ids = {int(i) for i in lm.special_token_ids}
    if lm.bos_token_id is not None:
        ids.add(int(lm.bos_token_id))
    return sorted(ids)
