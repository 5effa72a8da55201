"""`open_stream`: the one function train/eval/analyze/sweep call to get activations.

The cache when `activations.source` is "cache" (or "auto" and `activations.cache_dir` holds one),
else a live stream from `[model]` (pass an already loaded `lm` to reuse it). With [models.<label>]
(model diffing) it is a `ModelsStream` (models.py): one cache or live stream per model, zipped. Train
streams loop over epochs; eval streams make one pass, so an evaluation never counts a token twice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from saecli.data.manifest import MANIFEST, SHARD_GLOB
from saecli.data.stream import ActivationStream
from saecli.dtypes import DTYPES
from saecli.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from saecli.config.activations import ActivationsConfig
    from saecli.config.experiment import Experiment
    from saecli.config.model import ModelConfig
    from saecli.data.reader import CacheStream
    from saecli.lm.loading import LanguageModel


def need_activations(exp: Experiment) -> ActivationsConfig:
    """`exp.activations`, a ConfigError naming the section when the file has none (what every command that
    streams activations requires; typed, so the callers need no None checks)."""
    if exp.activations is None:
        raise ConfigError("this command needs an [activations] section", file=exp.source_file)
    return exp.activations


def need_model(exp: Experiment) -> ModelConfig:
    """`exp.model`, a ConfigError naming the section when the file has none."""
    if exp.model is None:
        raise ConfigError("this command needs a [model] section", file=exp.source_file)
    return exp.model


def cache_exists(cache_dir: str | Path | None) -> bool:
    if not cache_dir:
        return False
    root = Path(cache_dir)
    return root.is_dir() and any((p / MANIFEST).exists() for p in root.glob(SHARD_GLOB))


def uses_cache(exp: Experiment) -> bool:
    """Whether `open_stream` would read the cache for this experiment."""
    acts = exp.activations
    if acts is None:
        return False
    root = acts.cache_dir
    if exp.models and root:  # one cache per model: <cache_dir>/<label>
        root = str(Path(root) / next(iter(exp.models)))
    return acts.source == "cache" or (acts.source == "auto" and cache_exists(root))


def cache_stream(
    cache_dir: str | Path,
    acts: ActivationsConfig,
    hooks: list[str],
    rank: int,
    world_size: int,
    epochs: int | None,
    max_norm_ratio: float,
) -> CacheStream:
    """The cache reader with the [activations] settings (batch, shuffle buffer, seed, dtype, chunk checks),
    for one cache dir — a single model's or one label's of a [models] run."""
    from saecli.data.reader import CacheStream

    return CacheStream(
        cache_dir,
        hook_points=hooks,
        batch_size=acts.batch_size,
        shuffle=acts.shuffle,
        buffer_tokens=acts.shuffle_buffer_tokens,
        seed=acts.seed,
        rank=rank,
        world_size=world_size,
        epochs=epochs,
        dtype=DTYPES[acts.override_dtype] if acts.override_dtype else None,
        max_norm_ratio=max_norm_ratio,
        verify=acts.verify_chunks,
    )


def open_stream(
    exp: Experiment,
    *,
    purpose: Literal["train", "eval"] = "train",
    rank: int = 0,
    world_size: int = 1,
    contexts: bool = False,
    hook_points: list[str] | None = None,
    skip_documents: int | None = None,
    lm: LanguageModel | dict[str, LanguageModel] | None = None,
) -> ActivationStream:
    """The activation stream an experiment describes (see the module docstring). `lm`: the loaded model to
    reuse, or {label: model} for a [models] experiment."""
    if purpose not in ("train", "eval"):
        raise ValueError(f"purpose must be 'train' or 'eval', found {purpose!r}")
    acts = need_activations(exp)
    if exp.models:
        from saecli.data.models import open_models_stream

        lms = lm if isinstance(lm, dict) else None
        return open_models_stream(
            exp,
            purpose=purpose,
            rank=rank,
            world_size=world_size,
            contexts=contexts,
            hook_points=hook_points,
            skip_documents=skip_documents,
            lms=lms,
            use_cache=uses_cache(exp),
        )
    if isinstance(lm, dict):
        raise UsageError("a model per label serves a [models] experiment; this one has a single [model]")
    hooks = list(hook_points or acts.hook_points)
    epochs = 1 if purpose == "eval" else None
    if uses_cache(exp):
        if contexts:
            raise UsageError(
                f"this dictionary needs whole contexts (e.g. LORSA), which a token cache ({acts.cache_dir}) cannot give: "
                "set activations.source = 'live' to compute them from [model]"
            )
        return cache_stream(str(acts.cache_dir), acts, hooks, rank, world_size, epochs, acts.max_norm_ratio)
    from saecli.data.live import LiveStream

    model_cfg = need_model(exp)
    if lm is None:
        from saecli.lm import load_model

        lm = load_model(model_cfg)
    from saecli.lm import validate_hooks

    validate_hooks(lm, hooks)
    dataset = exp.dataset
    if purpose == "eval":  # every token of one pass is used: shuffling would only delay the first batch
        acts = dataclasses.replace(acts, shuffle=False)
    if skip_documents is not None:
        dataset = dataclasses.replace(dataset, skip_documents=skip_documents)
    return LiveStream(
        lm,
        dataset,
        acts,
        hook_points=hooks,
        contexts=contexts,
        rank=rank,
        world_size=world_size,
        epochs=epochs,
        model_cfg=model_cfg,
    )
