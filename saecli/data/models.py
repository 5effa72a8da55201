"""`ModelsStream`: several models' activations on the same tokens, as one stream (model diffing).

One child stream per model ([models.<label>], see saecli/config/models.py), zipped batch by batch:

    live   every model runs on the tokens the FIRST model's tokenizer packs (one packer shared by all
           children); at open, `check_tokenizers` tokenises a sample of the text with every model's
           tokenizer and stops (ConfigError naming models.<label>.name) if any differs from the first.
    cache  activations.cache_dir holds one cache per model, in <cache_dir>/<label>/ (`saecli generate`
           with [models] writes them so); at open their chunk layouts must be equal, then every cache
           is checked against the first with `check --against`'s verification (same token ids,
           documents, positions in the same order).

The children share seed, shuffle and window sizes, so their permutations are equal and their
batches hold the same tokens in the same order; every batch is still checked (tokens, doc, pos must
be equal, else UsageError) — a cheap guard against two caches cut into different chunks. Activations
are renamed "<label>/<hook point>"; massive-activation tokens are dropped from the merged batch (a
token any model flags leaves every head, so the heads stay aligned). The state is one child state
per label; resuming needs the same labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saecli.config.models import head_name
from saecli.data.batch import Batch
from saecli.data.outliers import drop_outliers
from saecli.data.stream import ActivationStream
from saecli.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from saecli.data.reader import CacheStream
    from saecli.lm.loading import LanguageModel

TOKENIZER_SAMPLE_DOCUMENTS = 64  # documents tokenised by every model's tokenizer at open


class ModelsStream:
    """Zip of per-model streams; implements saecli.data.stream.ActivationStream."""

    def __init__(self, children: Mapping[str, ActivationStream], *, max_norm_ratio: float = 0.0, describe: str = ""):
        if len(children) < 2:
            raise UsageError(f"a models stream zips at least two streams, found {len(children)}")
        self.children = dict(children)
        self.labels = list(children)
        first = children[self.labels[0]]
        self.contexts = bool(first.contexts)
        self.hook_points = [head_name(label, h) for label, s in children.items() for h in s.hook_points]
        self.d_model = {head_name(label, h): d for label, s in children.items() for h, d in s.d_model.items()}
        self.max_norm_ratio = float(max_norm_ratio)
        self.dropped_tokens = 0
        self.describe = describe
        self._iters: dict[str, Iterator[Batch]] | None = None

    @property
    def mean_norms(self) -> dict[str, float] | None:
        out: dict[str, float] = {}
        for label, s in self.children.items():
            norms = s.mean_norms
            if norms is None:
                return None
            out.update({head_name(label, h): v for h, v in norms.items()})
        return out

    @property
    def lm(self) -> LanguageModel | None:
        """The first model (what a dictionary's model-based init would read), or None for caches."""
        return self.children[self.labels[0]].lm

    def documents_consumed(self) -> int:
        return max(int(s.documents_consumed()) for s in self.children.values())  # type: ignore[attr-defined]

    def __iter__(self) -> ModelsStream:
        return self

    def __next__(self) -> Batch:
        if self._iters is None:
            self._iters = {label: iter(s) for label, s in self.children.items()}
        parts: dict[str, Batch] = {}
        for label, it in self._iters.items():
            b = next(it, None)
            if b is None:  # like zip: the pass ends with the shortest (a longer cache's extra tokens unused)
                raise StopIteration
            parts[label] = b
        batch = self._merge(parts)
        if self.max_norm_ratio:
            batch, dropped = drop_outliers(batch, self.max_norm_ratio)
            self.dropped_tokens += dropped
        return batch

    def _merge(self, parts: dict[str, Batch]) -> Batch:
        ref_label, ref = next(iter(parts.items()))
        for label, b in parts.items():
            for what in ("tokens", "doc", "pos"):
                x, y = getattr(ref, what), getattr(b, what)
                if (x is None) != (y is None) or (x is not None and (x.shape != y.shape or not torch.equal(x, y))):
                    raise UsageError(
                        f"the batches of models {ref_label!r} and {label!r} hold different {what}: "
                        "their streams are not aligned (same text, seed, shuffle and window sizes?)"
                    )
        acts = {head_name(label, h): a for label, b in parts.items() for h, a in b.acts.items()}
        return Batch(acts, ref.tokens, ref.doc, ref.pos, ref.mask, dict(ref.meta))

    def state_dict(self) -> dict:
        return {
            "kind": "models",
            "labels": self.labels,
            "streams": {label: s.state_dict() for label, s in self.children.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "models" or state.get("labels") != self.labels:
            raise UsageError(
                f"cannot resume this models stream: its models were {state.get('labels')!r}, now {self.labels!r}"
            )
        for label, s in self.children.items():
            s.load_state_dict(state["streams"][label])
        self._iters = None

    def close(self) -> None:
        for s in self.children.values():
            s.close()


# --------------------------------------------------------------------------- opening


def model_cache_dirs(exp: Any) -> dict[str, Path]:
    """<activations.cache_dir>/<label> for every model."""
    root = Path(exp.activations.cache_dir)
    return {label: root / label for label in exp.models}


def check_tokenizers(lms: dict[str, Any], dataset: Any, *, documents: int = TOKENIZER_SAMPLE_DOCUMENTS) -> None:
    """Every model's tokenizer gives the first one's token ids (BOS and separator included) on the first
    `documents` documents of the text; else a ConfigError naming both models' keys and the first difference."""
    from saecli.data.packing import encoder_for
    from saecli.data.text import iter_documents
    from saecli.data.tokens import separator_id

    labels = list(lms)
    ref = lms[labels[0]]
    docs = [text for _, text in zip(range(documents), (t for _, t in iter_documents(dataset)))]
    ref_ids = encoder_for(ref.tokenizer)(docs)
    for label in labels[1:]:
        lm = lms[label]
        key = f"models.{label}.name"
        for what, a, b in (
            ("BOS token id", ref.bos_token_id, lm.bos_token_id),
            (
                "separator token id",
                separator_id(ref.tokenizer, ref.bos_token_id),
                separator_id(lm.tokenizer, lm.bos_token_id),
            ),
        ):
            if a != b:
                raise ConfigError(
                    f"{label!r} and {labels[0]!r} tokenise differently: {what} {b} vs {a} "
                    f"(models.{labels[0]}.name): the models must share one tokenizer",
                    key=key,
                )
        ids = encoder_for(lm.tokenizer)(docs)
        for i, (x, y) in enumerate(zip(ref_ids, ids)):
            x, y = list(x), list(y)
            if x != y:
                at = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                raise ConfigError(
                    f"{label!r} and {labels[0]!r} tokenise document {i} differently from token {at} on "
                    f"({y[at : at + 4]} vs {x[at : at + 4]} in models.{labels[0]}.name): the models must share one "
                    "tokenizer",
                    key=key,
                )


def open_models_stream(
    exp: Any,
    *,
    purpose: str,
    rank: int,
    world_size: int,
    contexts: bool,
    hook_points: list[str] | None,
    skip_documents: int | None,
    lms: dict[str, Any] | None,
    use_cache: bool,
) -> ModelsStream:
    """The zipped stream of every [models.<label>] (see the module docstring); `hook_points` are head names
    ('<label>/<hook>', default: every model × activations.hook_points)."""
    from saecli.config.models import split_head

    acts = exp.activations
    wanted = list(hook_points or [head_name(label, h) for label in exp.models for h in acts.hook_points])
    per_model: dict[str, list[str]] = {label: [] for label in exp.models}
    for name in wanted:
        label, hook = split_head(name)
        if label not in per_model:
            raise UsageError(
                f"{name!r} names no model of [models] ({', '.join(per_model)}): heads are '<label>/<hook point>'"
            )
        per_model[label].append(hook)
    if any(not hooks for hooks in per_model.values()):  # every model is read: the zip needs one batch of each
        per_model = {label: hooks or [acts.hook_points[0]] for label, hooks in per_model.items()}
    epochs = 1 if purpose == "eval" else None
    if purpose == "eval":
        acts = dataclasses.replace(acts, shuffle=False)
    quiet = dataclasses.replace(acts, max_norm_ratio=0.0)  # outliers leave the merged batch, never one model's
    children: dict[str, Any] = {}  # LiveStream / CacheStream: ActivationStreams with documents_consumed()
    if use_cache:
        children = _cache_children(exp, quiet, per_model, contexts, rank, world_size, epochs)
        describe = f"caches {acts.cache_dir}/{{{','.join(exp.models)}}}"
    else:
        from saecli.data.live import LiveStream
        from saecli.data.tokens import packer_for
        from saecli.lm import load_model, validate_hooks

        lms = dict(lms or {})
        for label, cfg in exp.models.items():
            if label not in lms:
                lms[label] = load_model(cfg)
            validate_hooks(lms[label], per_model[label])
        dataset = (
            exp.dataset if skip_documents is None else dataclasses.replace(exp.dataset, skip_documents=skip_documents)
        )
        check_tokenizers(lms, dataset)
        first = next(iter(exp.models))
        packer = packer_for(lms[first], quiet, exp.models[first])  # one tokenizer packs the text for every model
        for label in exp.models:
            children[label] = LiveStream(
                lms[label],
                dataset,
                quiet,
                hook_points=per_model[label],
                contexts=contexts,
                rank=rank,
                world_size=world_size,
                epochs=epochs,
                packer=packer,
                model_cfg=exp.models[label],
            )
        describe = "live " + " vs ".join(f"{label}={cfg.name}" for label, cfg in exp.models.items())
    stream = ModelsStream(children, max_norm_ratio=acts.max_norm_ratio, describe=f"{describe} on {exp.dataset.path}")
    if hook_points is not None:  # keep the caller's order and only the heads asked for
        stream.hook_points = [h for h in wanted]
    return stream


def _cache_children(
    exp: Any, acts: Any, per_model: dict[str, list[str]], contexts: bool, rank: int, world_size: int, epochs: int | None
) -> dict[str, CacheStream]:
    from saecli.data.open import cache_exists, cache_stream
    from saecli.data.verify import check_against

    if contexts:
        raise UsageError(
            "this dictionary needs whole contexts, which token caches cannot give: set activations.source = 'live'"
        )
    dirs = model_cache_dirs(exp)
    missing = [f"{d} ({label})" for label, d in dirs.items() if not cache_exists(d)]
    if missing:
        raise UsageError(
            f"no activation cache in {', '.join(missing)}: with [models], activations.cache_dir holds "
            "one cache per model label (`saecli generate` writes them)"
        )
    labels = list(dirs)
    children = {
        label: cache_stream(dirs[label], acts, per_model[label], rank, world_size, epochs, max_norm_ratio=0.0)
        for label in labels
    }
    # cheap first: equal chunks ⇒ equal windows and permutations ⇒ aligned batches (each batch is still checked)
    layout = {label: [c.n_tokens for c in s.index.chunks] for label, s in children.items()}
    for label in labels[1:]:
        if layout[label] != layout[labels[0]]:
            raise UsageError(
                f"the caches of {labels[0]!r} and {label!r} are cut into different chunks "
                f"({len(layout[labels[0]])} vs {len(layout[label])} chunks, "
                f"{sum(layout[labels[0]]):,} vs {sum(layout[label]):,} tokens): generate them with "
                "the same activations.total_tokens and chunk_tokens (`saecli generate` with [models])"
            )
    for label in labels[1:]:  # then every token id, document and position (`saecli check --against`)
        problems = check_against(dirs[labels[0]], dirs[label])
        if problems:
            p = problems[0]
            raise UsageError(
                f"the caches of {labels[0]!r} and {label!r} are not of the same text: {p.file}: {p.detail}"
            )
    return children
