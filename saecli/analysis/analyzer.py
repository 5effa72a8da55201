"""Feature analysis: stream whole contexts through the model and a dictionary, keep per-feature statistics.

    analyzer = FeatureAnalyzer(dictionary, cfg, context_size=256)
    for batch in context_batches(lm, dataset_cfg, ...):     # Batch: acts [B, T, d], tokens/doc/pos/mask [B, T]
        analyzer.update(batch)
    result = analyzer.result(decode=...)                     # AnalysisResult (saecli/analysis/records.py)
    publish(result, folder, store, sae_name, series)          # one atomic file + the store (atomic replace)

The dictionary is used only through its interface (normalize, encode, decoder_norms, decoder_directions,
in_hooks/out_hooks, needs_context). Kind-specific extras come through two optional methods a kind may
define; the analyzer never names a kind:

- `analysis_extras(self) -> dict[str, Tensor]`: static per-feature arrays whose first dimension is d_sae
  (e.g. a crosscoder's decoder norm per head). Every dictionary writing several out hooks already gets
  `decoder_norm_per_hook` [d_sae, n_out_hooks] (per head for a crosscoder, per layer for a CLT) and
  `meta["out_hooks"]` naming the columns.
- `context_extras(self, inputs: dict[hook, Tensor[B, T, d]], features: Tensor[B], positions: Tensor[B])
  -> dict[str, Tensor[B, ...]]`: called after the stream with each feature's top context re-run through
  the model (normalised in-hook activations), the feature index and the position of its peak token;
  e.g. LORSA returns the attention pattern row of head `features[b]` at query `positions[b]` ([B, T]).
  Features that never fired get zeros.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from saecli.analysis.records import AnalysisResult, analysis_dir
from saecli.analysis.topk import FeatureBook, default_specs
from saecli.data.batch import Batch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from saecli.config.activations import ActivationsConfig
    from saecli.config.analyze import AnalyzeConfig
    from saecli.config.dataset import DatasetConfig
    from saecli.dictionaries.base import Dictionary
    from saecli.lm.loading import LanguageModel
    from saecli.store.base import Store


Forward = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def _param(dictionary: torch.nn.Module) -> torch.Tensor:
    return next(iter(dictionary.parameters()))


class FeatureAnalyzer:
    """Encodes context batches and feeds the per-feature bookkeeping (`FeatureBook`)."""

    def __init__(self, dictionary: Dictionary, cfg: AnalyzeConfig, context_size: int):
        self.dictionary = dictionary
        self.cfg = cfg
        self.context_size = context_size
        p = _param(dictionary)
        self.device, self.dtype = p.device, p.dtype
        specs = default_specs(cfg.top_samples, list(cfg.tiers), cfg.tier_samples, cfg.non_activating_samples)
        self.book = FeatureBook(
            dictionary.d_sae,
            context_size,
            specs,
            bins=cfg.histogram_bins,
            hist_range=(float(cfg.histogram_range[0]), float(cfg.histogram_range[1])),
            seed=cfg.seed,
            device=self.device,
        )
        self.started = time.perf_counter()

    @torch.no_grad()
    def encode(self, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw in-hook activations [B, T, d] → feature activations [B, T, d_sae]."""
        d = self.dictionary
        raw = {h: acts[h].to(device=self.device, dtype=self.dtype) for h in d.in_hooks}
        B, T = next(iter(raw.values())).shape[:2]
        if d.needs_context:
            feats = d.encode(d.normalize(raw))
        else:
            flat = {h: x.reshape(B * T, x.shape[-1]) for h, x in raw.items()}
            feats = d.encode(d.normalize(flat))
        if feats.is_sparse:
            feats = feats.to_dense()
        return feats.reshape(B, T, -1)

    @torch.no_grad()
    def update(self, batch: Batch) -> int:
        """One batch of whole contexts; returns the number of tokens that counted."""
        feats = self.encode(batch.acts)
        dev = feats.device
        mask = batch.mask.to(dev) if batch.mask is not None else None
        before = self.book.n_tokens
        self.book.update(
            feats,
            batch.tokens.to(dev),
            None if batch.doc is None else batch.doc.to(dev),
            None if batch.pos is None else batch.pos.to(dev),
            mask,
        )
        return self.book.n_tokens - before

    @torch.no_grad()
    def result(
        self,
        *,
        name: str | None = None,
        decode: Callable[[list[int]], list[str]] | None = None,
        forward: Forward | None = None,
        batch_contexts: int = 8,
        meta: dict | None = None,
    ) -> AnalysisResult:
        """Collect everything into an `AnalysisResult` (CPU numpy arrays)."""
        book = self.book
        samplings = {}
        for cs in book.sets:
            s = cs.sorted()
            samplings[cs.spec.name] = {k: v.cpu().numpy() for k, v in s.items()}
        extras, extra_meta = static_extras(self.dictionary)
        if forward is not None and self.dictionary.has_context_extras() and "top" in samplings:
            extras.update(self._context_extras(samplings["top"], forward, batch_contexts))
        vocab: dict[str, str] = {}
        if decode is not None:
            ids = np.unique(np.concatenate([s["tokens"].reshape(-1) for s in samplings.values()] or [np.zeros(0)]))
            vocab = {str(int(i)): t for i, t in zip(ids.tolist(), decode([int(i) for i in ids]))}
        elapsed = time.perf_counter() - self.started
        info = {
            "analysis": name or self.cfg.name,
            "d_sae": int(self.dictionary.d_sae),
            "context_size": self.context_size,
            "n_contexts": int(book.n_contexts),
            "in_hooks": list(self.dictionary.in_hooks),
            "out_hooks": list(self.dictionary.out_hooks),
            "samplings": {
                cs.spec.name: {"kind": cs.spec.kind, "n": cs.spec.n, "fraction": cs.spec.fraction} for cs in book.sets
            },
            "histogram": {"bins": int(book.hist.shape[1]), "range": list(self.cfg.histogram_range), "scale": "log"},
            "seconds": round(elapsed, 3),
            "tokens_per_second": round(book.n_tokens / elapsed, 1) if elapsed > 0 else None,
            **extra_meta,
            **(meta or {}),
            "vocab": vocab,
        }
        return AnalysisResult(
            name=name or self.cfg.name,
            n_analyzed_tokens=int(book.n_tokens),
            act_times=book.act_times().cpu().numpy(),
            max_act=book.max_act.cpu().numpy(),
            hist_counts=book.hist.cpu().numpy(),
            hist_edges=book.edges.numpy(),
            samplings=samplings,
            extras=extras,
            meta=info,
        )

    def _context_extras(
        self, top: dict[str, np.ndarray], forward: Forward, batch_contexts: int
    ) -> dict[str, np.ndarray]:
        """Re-run each feature's top context and ask the dictionary for its context-dependent extras."""
        d = self.dictionary
        fired = np.nonzero(top["count"] > 0)[0]
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(fired), batch_contexts):
            ids = fired[start : start + batch_contexts]
            tokens = torch.from_numpy(top["tokens"][ids, 0].astype(np.int64))
            peaks = torch.from_numpy(top["acts"][ids, 0].astype(np.float32).argmax(-1))
            acts = forward(tokens)
            inputs = d.normalize({h: acts[h].to(device=self.device, dtype=self.dtype) for h in d.in_hooks})
            got = d.context_extras(inputs, torch.from_numpy(ids).to(self.device), peaks.to(self.device))
            for key, tensor in got.items():
                value = tensor.detach().float().cpu().numpy()
                if key not in out:
                    out[key] = np.zeros((d.d_sae, *value.shape[1:]), dtype=np.float32)
                out[key][ids] = value
        return out


def static_extras(dictionary: Dictionary) -> tuple[dict[str, np.ndarray], dict]:
    """Per-feature arrays from the dictionary's weights: decoder norms (per out hook when several)."""
    out: dict[str, np.ndarray] = {}
    meta: dict = {}
    with torch.no_grad():
        try:
            out["decoder_norm"] = dictionary.decoder_norms().detach().float().cpu().numpy()
        except NotImplementedError:
            pass
        if len(dictionary.out_hooks) > 1:
            try:
                per = [dictionary.decoder_directions(h).detach().float().norm(dim=-1) for h in dictionary.out_hooks]
                out["decoder_norm_per_hook"] = torch.stack(per, dim=1).cpu().numpy()
                meta["extra_columns"] = {"decoder_norm_per_hook": list(dictionary.out_hooks)}
            except NotImplementedError:
                pass
        for key, value in dictionary.analysis_extras().items():
            out[key] = value.detach().float().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
    return out, meta


# ---------------------------------------------------------------------------------------------- live data


def context_batches(
    lm: LanguageModel,
    dataset_cfg: DatasetConfig,
    acts_cfg: ActivationsConfig,
    hooks: list[str],
    *,
    context_size: int,
    batch_contexts: int,
) -> Iterator[Batch]:
    """Whole packed contexts from the dataset with the model's activations at `hooks` ([B, T, d]).

    Massive-activation tokens (see `saecli.data.outliers`) are masked out, as training dropped them.
    """
    from saecli.data.outliers import drop_outliers
    from saecli.data.prefetch import Prefetch
    from saecli.data.text import iter_documents
    from saecli.data.tokens import packer_for
    from saecli.lm import run_to_hooks

    packer = packer_for(lm, dataclasses.replace(acts_cfg, context_size=context_size))
    contexts = Prefetch(packer.contexts(iter_documents(dataset_cfg), batch_contexts), size=4, name="saecli-tokenise")
    try:
        for ctx in contexts:
            acts = run_to_hooks(lm, ctx.tokens.to(lm.device), hooks)
            batch = Batch(acts, ctx.tokens, ctx.doc, ctx.pos, ctx.mask)
            if acts_cfg.max_norm_ratio:
                batch, _ = drop_outliers(batch, acts_cfg.max_norm_ratio)
            yield batch
    finally:
        contexts.close()


def run_analysis(
    analyzer: FeatureAnalyzer,
    batches: Iterable[Batch],
    total_tokens: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Feed batches until `total_tokens` counted tokens were analysed (whole batches); returns the count."""
    done = 0
    for batch in batches:
        n = analyzer.update(batch)
        done += n
        if progress is not None:
            progress(n)
        if done >= total_tokens:
            break
    return done


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte → printable character table (GPT-2 style tokenizers)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def decoder_for(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[int]], list[str]]:
    """Token ids → the text each token stands for on its own.

    A token holding part of a multi-byte character decodes to U+FFFD; it is shown by its bytes instead
    (`\\xe2\\x80`) when the tokenizer is byte-level, else by its raw vocabulary entry.
    """
    table = _byte_decoder()

    def one(i: int) -> str:
        text = str(tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        if "\ufffd" not in text:
            return text
        raw = tokenizer.convert_ids_to_tokens(i)
        if isinstance(raw, str) and raw and all(c in table for c in raw):
            return bytes(table[c] for c in raw).decode("utf-8", errors="backslashreplace")
        return raw if isinstance(raw, str) else text

    def decode(ids: list[int]) -> list[str]:
        return [one(int(i)) for i in ids]

    return decode


def publish(
    result: AnalysisResult,
    sae_folder: str | Path,
    store: Store | None = None,
    *,
    sae_name: str = "",
    series: str = "default",
) -> Path:
    """Write the analysis file (atomic) and then replace the analysis in the store (atomic)."""
    folder = analysis_dir(sae_folder, result.name)
    path = result.save(folder)
    if store is not None:
        store.replace_analysis(sae_name, series, result.name, result.records(), result.store_meta())
    return path
