"""Which text an evaluation may use: documents the training run never saw.

Documents are numbered in a fixed order (saecli.data.text), so "held out" is a document index:

- training read a **live** stream: it consumed documents [dataset.skip_documents, D). D is taken
  from the run's `summary.json` (`documents_consumed`) when the trainer recorded it, else recomputed
  by packing the text exactly as the live stream does (tokeniser only, no model forward): the token
  windows it read until it had produced the run's tokens (`summary.json` tokens, else
  `trainer.total_training_tokens`);
- training read a **cache**: D is the cache manifest's `documents_consumed` (every chunk may be
  shuffled into training, so the whole cache counts as seen).

The evaluation then reads, in order of preference: `eval.cache_dir` (an activation cache of other
documents), else the live model from document `eval.skip_documents` (default D), else — no model
configured — the training cache itself, with a warning that the numbers are on training data.
`eval.skip_documents` below D, or an eval cache whose documents intersect [start, D), also warn.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saecli.data.open import need_activations

if TYPE_CHECKING:
    from saecli.config.experiment import Experiment
    from saecli.lm.loading import LanguageModel


SUMMARY_FILE = "summary.json"


@dataclass
class HeldOut:
    exp: Experiment  # the experiment to open the eval stream with (its [activations] source may be changed)
    source: str  # "live" | "cache"
    skip_documents: int | None  # first document of the eval text (live stream, CE contexts)
    training_documents: tuple[int, int] | None  # [start, end) of the documents training read, when known
    how: str  # how the training range was found (for eval.json)
    overlap: str | None = None  # why the eval data may overlap training (warned)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "skip_documents": self.skip_documents,
            "training_documents": list(self.training_documents) if self.training_documents else None,
            "training_documents_from": self.how,
            "cache_dir": need_activations(self.exp).cache_dir if self.source == "cache" else None,
            "overlaps_training": self.overlap is not None,
            "overlap": self.overlap,
        }


def _read_summary(run_folder: Path | None) -> dict:
    if run_folder is None:
        return {}
    path = Path(run_folder) / SUMMARY_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _training_world_size(run_folder: Path | None) -> int:
    """Data-parallel ranks of the training run (one stream state per rank in its last checkpoint)."""
    if run_folder is None:
        return 1
    try:
        import torch

        from saecli.training.checkpoint import STATE_FILE, latest_checkpoint

        found = latest_checkpoint(run_folder)
        if found is None:
            return 1
        state = torch.load(found[1] / STATE_FILE, map_location="cpu", weights_only=False)
        streams = state.get("stream")
        return max(1, len(streams)) if isinstance(streams, list) else 1
    except Exception:  # an unreadable checkpoint only costs the exact rank count
        return 1


def live_documents_consumed(exp: Experiment, lm: LanguageModel, tokens: int, world_size: int = 1) -> tuple[int, bool]:
    """(D, exhausted): a skip_documents past every document a live training stream read for `tokens`.

    Replays the live stream's packing (its windows of `window_contexts` contexts per rank) without
    running the model; `exhausted` is True when the text ran out first (training looped over it).
    """
    from saecli.data.live import LiveStream
    from saecli.data.text import iter_documents

    end, exhausted = exp.dataset.skip_documents, False
    per_rank = math.ceil(tokens / world_size)
    for rank in range(world_size):
        model_cfg = exp.model
        if model_cfg is None and exp.models:  # several models: the first one packs the text
            model_cfg = next(iter(exp.models.values()))
        stream = LiveStream(
            lm, exp.dataset, need_activations(exp), rank=rank, world_size=world_size, model_cfg=model_cfg
        )
        seen = 0
        docs = iter_documents(exp.dataset, rank, world_size)
        for ctx in stream.packer.contexts(docs, stream.window_contexts):
            seen += int(ctx.mask.sum())
            end = max(end, int(ctx.doc.max()) + 1)
            if seen >= per_rank:
                break
        else:
            exhausted = True
    return end, exhausted


def _cache_range(cache_dir: str) -> tuple[dict, int, int]:
    """(dataset identity, first document, documents_consumed) of an activation cache."""
    from saecli.data.manifest import open_cache

    index = open_cache(cache_dir)
    dataset = dict(index.first.get("dataset") or {})
    return dataset, int(dataset.get("skip_documents", 0) or 0), int(index.documents_consumed)


def _same_text(a: dict, b: dict) -> bool:
    keys = ("path", "name", "split", "text_column", "data_files")
    return all(a.get(k) == b.get(k) for k in keys)


def plan_heldout(exp: Experiment, run_folder: Path | None, lm: LanguageModel | None) -> HeldOut:
    """Decide where the eval activations and CE contexts come from (see the module docstring)."""
    from saecli.config.base import to_dict
    from saecli.data.open import uses_cache

    acts = need_activations(exp)
    ev = exp.eval
    train_text = to_dict(exp.dataset)
    training: tuple[int, int] | None = None
    how = "unknown"
    notes: list[str] = []
    if uses_cache(exp) and acts.cache_dir:
        train_text, start, end = _cache_range(acts.cache_dir)
        training, how = (start, end), f"the training cache's manifest ({acts.cache_dir})"
    else:
        summary = _read_summary(run_folder)
        start = exp.dataset.skip_documents
        if isinstance(summary.get("documents_consumed"), int):
            training, how = (start, int(summary["documents_consumed"])), f"{SUMMARY_FILE} of the run"
        elif lm is not None:
            tokens = summary.get("tokens")
            if not isinstance(tokens, int) or tokens <= 0:
                tokens, what = exp.trainer.total_training_tokens, "trainer.total_training_tokens"
            else:
                what = f"{tokens:,} trained tokens ({SUMMARY_FILE})"
            end, exhausted = live_documents_consumed(exp, lm, tokens, _training_world_size(run_folder))
            training, how = (start, end), f"re-packing the text for {what}"
            if exhausted:
                notes.append(
                    "training read every document of the dataset (it looped over the text): "
                    "no held-out text remains in it"
                )

    if ev.cache_dir:
        eval_text, e_start, e_end = _cache_range(ev.cache_dir)
        overlap = None
        if Path(ev.cache_dir).resolve() == Path(acts.cache_dir or "\0").resolve():
            overlap = f"eval.cache_dir is the training cache ({ev.cache_dir})"
        elif training and _same_text(eval_text, train_text) and e_start < training[1] and training[0] < e_end:
            overlap = (
                f"the eval cache holds documents [{e_start}, {e_end}) and training read "
                f"[{training[0]}, {training[1]}) of the same text"
            )
        use = _with_activations(exp, cache_dir=ev.cache_dir, source="cache")
        skip = ev.skip_documents if ev.skip_documents is not None else (training[1] if training else None)
        return HeldOut(use, "cache", skip, training, how, overlap, notes)

    if exp.model is not None or exp.models:
        skip = ev.skip_documents if ev.skip_documents is not None else (training[1] if training else None)
        overlap = None
        if training and skip is not None and skip < training[1] and _same_text(to_dict(exp.dataset), train_text):
            overlap = (
                f"the eval text starts at document {skip} but training read documents [{training[0]}, {training[1]})"
            )
        elif skip is None:
            overlap = "the documents training read are unknown (set eval.skip_documents)"
        if notes and overlap is None:
            overlap = notes[0]
        return HeldOut(_with_activations(exp, source="live"), "live", skip, training, how, overlap, notes)

    overlap = (
        f"no [model] to compute held-out activations and no eval.cache_dir: evaluating on the training "
        f"cache {acts.cache_dir}"
    )
    return HeldOut(exp, "cache", None, training, how, overlap, notes)


def _with_activations(exp: Experiment, **changes: Any) -> Experiment:
    return dataclasses.replace(exp, activations=dataclasses.replace(need_activations(exp), **changes))
