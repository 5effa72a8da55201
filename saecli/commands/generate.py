"""`saecli generate`: write an activation cache (safetensors chunks + manifest) from a model and text."""

from __future__ import annotations

import typer

from saecli.commands import ExperimentArg, SetOption, load


def generate(experiment: ExperimentArg, overrides: SetOption = None) -> None:
    """Run the model over the text and save the activations at the hook points to activations.cache_dir.

    A killed run, started again with the same file, resumes after its last complete chunk and ends
    with the same files as an uninterrupted one. Several processes each write one shard: set
    activations.n_shards and start_shard, or start them with `accelerate launch`/torchrun (RANK and
    WORLD_SIZE pick the shard).

    Examples:

        saecli generate experiments/tiny/generate.toml

        saecli generate exp.toml --set activations.total_tokens=2000000 --set activations.override_dtype=bfloat16

        accelerate launch --multi_gpu --num_processes 2 -m saecli generate exp.toml

    With [models.<label>] (model diffing) it writes one cache per model, <cache_dir>/<label>, of the same
    tokens (the tokenizers are checked to agree first); train/eval read them together.
    """
    exp = load(experiment, overrides)
    if exp.models:  # model diffing: one cache per model, <cache_dir>/<label>, after checking the tokenizers agree
        _generate_models(exp)
        return
    _generate_one(exp)


def _generate_models(exp) -> None:
    import dataclasses
    from pathlib import Path

    from saecli.data.models import check_tokenizers
    from saecli.errors import ConfigError
    from saecli.lm import load_model

    exp.require("activations")
    if not exp.activations.cache_dir:
        raise ConfigError(
            "generate needs activations.cache_dir (one cache per model is written in <cache_dir>/<label>)",
            file=exp.source_file,
            key="activations.cache_dir",
        )
    check_tokenizers({label: load_model(cfg) for label, cfg in exp.models.items()}, exp.dataset)
    for label, cfg in exp.models.items():
        acts = dataclasses.replace(exp.activations, cache_dir=str(Path(exp.activations.cache_dir) / label))
        _generate_one(dataclasses.replace(exp, model=cfg, models=None, activations=acts))


def _generate_one(exp) -> None:
    from saecli import ui
    from saecli.data.manifest import shard_plan, shard_target
    from saecli.data.text import check_dataset
    from saecli.errors import ConfigError

    exp.require("model", "activations")
    acts = exp.activations
    if not acts.cache_dir:
        raise ConfigError(
            "generate needs activations.cache_dir (the folder to write the cache to)",
            file=exp.source_file,
            key="activations.cache_dir",
        )
    shard, n_shards = shard_plan(acts.n_shards, acts.start_shard)
    check_dataset(exp.dataset)
    from saecli.fsio import require_writable

    require_writable(acts.cache_dir, "activations.cache_dir")
    # heavy imports after the cheap checks
    from saecli.data.cache import generate_shard, tokens_written
    from saecli.lm import load_model, run_to_hooks, validate_hooks

    _pick_local_gpu()
    lm = load_model(exp.model)
    validate_hooks(lm, list(acts.hook_points))
    from saecli.data.cache import check_space

    check_space(exp, {h: int(lm.d_model) for h in acts.hook_points}, shard, n_shards)  # before any work
    ui.info(
        f"generating {acts.total_tokens:,} tokens of {', '.join(acts.hook_points)} from {lm.name} "
        f"into {acts.cache_dir} (shard {shard} of {n_shards})"
    )

    target = shard_target(acts.total_tokens, shard, n_shards)
    done = min(tokens_written(acts.cache_dir, shard), target)
    if done:
        ui.info(f"resuming after {done:,} tokens already in the cache")
    with ui.progress("generate", total=target, unit="tokens", completed=done) as handle:
        manifest = generate_shard(
            exp, lm, run_to_hooks, shard, n_shards, progress=lambda n, metrics: handle.advance(n, **metrics)
        )
    total, target = manifest["total_tokens"], manifest["target_tokens"]
    if total < target:
        ui.warn(f"the text ran out after {total:,} of {target:,} tokens")
    norms = ", ".join(f"{h} {v:.4g}" for h, v in manifest["mean_norms"].items())
    ui.result(
        f"shard {shard}: {total:,} tokens in {len(manifest['chunks'])} chunks at {acts.cache_dir} (mean ‖x‖: {norms})"
    )


def _pick_local_gpu() -> None:
    """Under a launcher, process LOCAL_RANK uses GPU LOCAL_RANK ('cuda'/'auto' mean the current device)."""
    import os

    import torch

    local = os.environ.get("LOCAL_RANK")
    if local is not None and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(int(local) % torch.cuda.device_count())


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
