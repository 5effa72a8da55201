"""Members from experiments: a seeded dictionary on its device, started fresh or restored from a checkpoint.

A fresh member is made the same way whether it trains alone (`saecli train`) or beside others
(`saecli sweep`): seed with `run.seed`, build the dictionary, initialise it on the stream's first batches
(read once per pass and replayed to each member, `Replay`), plan its steps. A resumed member gets the
weights and the optimiser, schedule and statistics state of its checkpoint (`Member.from_checkpoint`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from saecli.config.dictionary import DictionaryConfig
from saecli.config.experiment import Experiment
from saecli.data.batch import Batch
from saecli.data.stream import ActivationStream
from saecli.dictionaries.base import Dictionary
from saecli.dtypes import DTYPES
from saecli.errors import ConfigError, RunError, UsageError
from saecli.training.distributed import Sync
from saecli.training.member import Member
from saecli.training.tensor_parallel import new_member
from saecli.training.tensor_parallel import resumed_member as restore_member
from saecli.training.trainer import initialize, plan_steps

if TYPE_CHECKING:
    from saecli.lm.loading import LanguageModel
    from saecli.training.logger import WandbLogger


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def dictionary_config(exp: Experiment) -> DictionaryConfig:
    """The experiment's [dictionary] table (a ConfigError naming it when there is none)."""
    exp.require("dictionary")
    assert exp.dictionary is not None  # require raised otherwise
    return exp.dictionary


def resolve_device(exp: Experiment) -> torch.device:
    """`sae.device`; 'auto' = the model's device when one is set, else cuda when present, else cpu."""
    name = dictionary_config(exp).device
    if name == "auto" and exp.model is not None and exp.model.device != "auto":
        name = exp.model.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per process
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return torch.device(name)


def build(exp: Experiment, stream: ActivationStream) -> Dictionary:
    """The [dictionary] table's dictionary, freshly seeded with `run.seed`, sized from the stream, on its device and dtype."""
    from saecli.dictionaries.registry import build_dictionary

    seed_everything(exp.run.seed)  # the same seed gives the same start, alone or in a sweep
    sae = dictionary_config(exp)
    hooks = list(stream.hook_points)
    main_hook = sae.main_hook() or hooks[0]
    d_model = stream.d_model.get(main_hook, next(iter(stream.d_model.values())))
    return build_dictionary(sae, d_model, hooks).to(device=resolve_device(exp), dtype=DTYPES[sae.dtype])


class Replay:
    """The first `n` batches of a stream, replayed to each member's `initialize`; the stream is rewound,
    so training reads them again."""

    def __init__(self, stream: ActivationStream, n: int):
        start = stream.state_dict()
        it: Iterator[Batch] = iter(stream)
        self.batches: list[Batch] = []
        for _ in range(n):
            try:
                self.batches.append(next(it))
            except StopIteration:
                break
        stream.load_state_dict(start)
        if not self.batches:
            raise RunError("the activation stream yielded no batch")
        self.mean_norms = stream.mean_norms
        self.hook_points = list(stream.hook_points)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def wandb_logger(exp: Experiment, folder: Path, sync: Sync) -> WandbLogger | None:
    """The member's wandb run (resumed under its id), on the writing rank only; None when disabled."""
    if not exp.wandb.enabled or not sync.is_main:
        return None
    from saecli.config.load import experiment_dict
    from saecli.training.logger import WandbLogger

    return WandbLogger(
        folder,
        name=exp.run.name,
        project=exp.wandb.project,
        entity=exp.wandb.entity,
        mode=exp.wandb.mode,
        tags=exp.wandb.tags,
        dir=exp.wandb.dir,
        config=experiment_dict(exp),
    )


class ModelForInit:
    """The language model for kinds that initialise from it (`needs_model_init`): the one given (the
    live stream's, or the sweep's), else loaded from `[model]` on first use, once per pass."""

    def __init__(self, lm: LanguageModel | None = None):
        self.lm = lm

    def get(self, exp: Experiment) -> LanguageModel:
        if self.lm is None:
            from saecli.lm import load_model

            exp.require("model")  # a cached stream has no model: load it for the init alone
            assert exp.model is not None  # require raised otherwise
            self.lm = load_model(exp.model)
        return self.lm


def fresh_member(
    exp: Experiment, folder: Path, stream: ActivationStream, replay: Replay, *, sync: Sync, model: ModelForInit
) -> Member:
    """Build, initialise on the replayed first batches (rank 0's result broadcast) and plan a new member."""
    dictionary = build(exp, stream)
    lm = model.get(exp) if dictionary.needs_model_init else None
    batch_tokens = initialize(replay, [(dictionary, exp.init)], sync=sync, lm=lm)
    try:
        plan = plan_steps(
            exp.trainer.total_training_tokens, batch_tokens, exp.trainer.gradient_accumulation_steps, sync.world_size
        )
    except ValueError as exc:
        raise ConfigError(str(exc), file=exp.source_file, key="trainer.total_training_tokens") from None
    return new_member(
        dictionary,
        exp.trainer,
        total_steps=plan.total_steps,
        batch_tokens=plan.batch_tokens,
        folder=folder,
        name=exp.run.name,
        sync=sync,
        wandb=wandb_logger(exp, folder, sync),
    )


def resumed_member(
    exp: Experiment, folder: Path, checkpoint: Path, stream: ActivationStream, *, sync: Sync
) -> tuple[Member, dict]:
    """A member restored from `checkpoint`, and the checkpoint's shared state (stream positions, RNG)."""
    dictionary = build(exp, stream)
    try:
        return restore_member(
            dictionary,
            exp.trainer,
            checkpoint,
            folder=folder,
            name=exp.run.name,
            sync=sync,
            wandb=wandb_logger(exp, folder, sync),
        )
    except ValueError as exc:  # a checkpoint of another shape of run (world size, step count)
        raise UsageError(f"cannot resume from {checkpoint}: {exc}") from None
