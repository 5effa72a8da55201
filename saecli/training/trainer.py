"""The training loop: one stream, any number of members, each batch read once and fed to all.

    members = [Member(dictionary, trainer_cfg, total_steps=..., batch_tokens=..., folder=...)]
    fit(stream, members)

- `initialize(...)`: dataset-wise norm (the stream's `mean_norms`, else estimated on `init_batches`
  batches) and data-dependent init; the stream is rewound afterwards so training sees those batches too.
- `fit(...)`: feeds batches until every member has finished or stopped. A member whose loss turns
  NaN/inf stops (its last good checkpoint stays) while the others go on. Checkpoints are taken for all
  members together (they share the stream's position) at the steps each member asks for and every
  `checkpoint_every_seconds`. SIGINT/SIGTERM finish the current step, write a checkpoint and raise
  KeyboardInterrupt; a second Ctrl-C stops at once.

Progress and messages go to a `Reporter` (the command layer draws them); this module never prints.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from saecli.data.batch import Batch
from saecli.dictionaries.base import Dictionary
from saecli.training.checkpoint import CheckpointTimer
from saecli.training.distributed import LocalSync, Sync
from saecli.training.member import Member, rng_state
from saecli.training.stats import flat_rows

if TYPE_CHECKING:
    from saecli.config.init import InitConfig
    from saecli.data.stream import ActivationStream, BatchSource
    from saecli.lm.loading import LanguageModel


class Reporter(Protocol):
    """What the loop tells the outside world (the CLI draws a progress bar from it)."""

    def start(self, total_tokens: int, done_tokens: int) -> None: ...

    def advance(self, n_tokens: int) -> None: ...

    def log(self, member: str, record: dict[str, Any]) -> None: ...

    def warn(self, message: str) -> None: ...

    def info(self, message: str) -> None: ...


class NullReporter:
    """Reports nothing (library use and tests); warnings go to Python's `warnings`."""

    def start(self, total_tokens: int, done_tokens: int) -> None:
        pass

    def advance(self, n_tokens: int) -> None:
        pass

    def log(self, member: str, record: dict[str, Any]) -> None:
        pass

    def warn(self, message: str) -> None:
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def info(self, message: str) -> None:
        pass


@dataclass
class Plan:
    """How long a run is, in optimizer steps."""

    total_steps: int
    batch_tokens: int  # tokens of one batch on one rank


def plan_steps(total_training_tokens: int, batch_tokens: int, accumulation: int = 1, world_size: int = 1) -> Plan:
    """steps = total_training_tokens // tokens per optimizer step (batch × accumulation × ranks)."""
    per_step = batch_tokens * accumulation * world_size
    steps = total_training_tokens // per_step
    if steps < 1:
        raise ValueError(
            f"{total_training_tokens} tokens are less than one optimizer step ({per_step} tokens = "
            f"batch {batch_tokens} × accumulation {accumulation} × {world_size} process(es))"
        )
    return Plan(total_steps=int(steps), batch_tokens=int(batch_tokens))


# ---------------------------------------------------------------------------------------------- init
@torch.no_grad()
def estimate_mean_norms(batches: list[Batch], hooks: Iterable[str]) -> dict[str, float]:
    """E‖x‖ per hook point over the (counted) tokens of a few batches."""
    out = {}
    for hook in hooks:
        total, n = 0.0, 0
        for b in batches:
            mask = b.mask if b.is_context else None
            rows = flat_rows(b.acts[hook], mask).double()
            total += float(rows.norm(dim=-1).sum())
            n += rows.shape[0]
        out[hook] = total / max(n, 1)
    return out


@torch.no_grad()
def initialize(
    stream: BatchSource,
    dictionaries: list[tuple[Dictionary, InitConfig]],
    *,
    sync: Sync | None = None,
    lm: LanguageModel | None = None,
) -> int:
    """Data-dependent start of fresh dictionaries; returns the tokens of one batch (on this rank).

    `dictionaries` pairs each dictionary with its InitConfig. Draws max(init_batches) batches, sets the
    dataset-wise norm of every dictionary that uses it (from `stream.mean_norms` when the stream knows
    them, else estimated on those batches), calls `init_from_data` with the normalised batches, then
    rewinds the stream to where it was. A kind that initialises from the model itself (a transcoder
    from its MLP, LORSA from the attention) says so with `needs_model_init` and gets
    `init_from_model(lm, raw_batches)` with the `lm` given (the run driver passes the live stream's, or
    loads `[model]`). With several ranks, rank 0's result is broadcast.
    """
    sync = sync or LocalSync()
    n = max(int(init.init_batches) for _, init in dictionaries)
    start = stream.state_dict()
    it: Iterator[Batch] = iter(stream)
    batches: list[Batch] = []
    for _ in range(n):
        try:
            batches.append(next(it))
        except StopIteration:
            break
    if not batches:
        raise RuntimeError("the activation stream yielded no batch")
    stream.load_state_dict(start)
    known = stream.mean_norms or {}
    for dictionary, init_cfg in dictionaries:
        device = next(dictionary.parameters()).device
        dtype = next(dictionary.parameters()).dtype
        hooks = list(dict.fromkeys(dictionary.in_hooks + dictionary.out_hooks))
        if dictionary.cfg.norm_activation == "dataset-wise":
            missing = [h for h in hooks if h not in known]
            norms = {**{h: known[h] for h in hooks if h in known}, **estimate_mean_norms(batches, missing)}
            for hook in hooks:
                dictionary.set_dataset_norm(hook, norms[hook])
        picked = batches[: int(init_cfg.init_batches)]
        normed = [dictionary.normalize({h: b.acts[h].to(device, dtype) for h in hooks}) for b in picked]
        dictionary.init_from_data(normed, init_cfg)
        if dictionary.needs_model_init:
            raw = [{h: b.acts[h].to(device, dtype) for h in hooks} for b in picked]
            dictionary.init_from_model(lm, raw)
        if dictionary.cfg.pretrained:  # continue from a saved dictionary (any format)
            from saecli.interop.pretrained import start_from

            start_from(dictionary, dictionary.cfg.pretrained)
        if sync.world_size > 1:
            state = sync.broadcast_object({k: v.cpu() for k, v in dictionary.state_dict().items()})
            dictionary.load_state_dict(state)
    return batches[0].n_tokens


# ---------------------------------------------------------------------------------------------- loop
class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks between steps; a second Ctrl-C interrupts at once."""

    def __init__(self, enabled: bool):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self.enabled = enabled and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> _StopFlag:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def checkpoint_all(stream: ActivationStream, members: list[Member], sync: Sync, batches_seen: int) -> None:
    """One checkpoint for each member that is still sound, sharing the stream position and RNG states."""
    for m in members:  # collective on every rank, in the same order
        if m.status in ("running", "finished"):
            m.check_finite()
    sound = [m for m in members if m.status in ("running", "finished")]
    states = sync.gather_objects(stream.state_dict())
    shared = {"stream": states, "rng": rng_state(), "batches_seen": batches_seen}
    for m in sound:  # on every rank: rank 0 writes, except a sharded member's collective save
        m.save_checkpoint(shared)
    sync.barrier()


def fit(
    stream: ActivationStream,
    members: list[Member],
    *,
    reporter: Reporter | None = None,
    sync: Sync | None = None,
    handle_signals: bool = True,
) -> list[Member]:
    """Train every member on one pass of `stream` until all are finished, diverged or the stream ends.

    Members must already be restored (resume) or fresh, and the stream positioned accordingly.
    Returns the members; look at each one's `status` and `message`.
    """
    reporter = reporter or NullReporter()
    sync = sync or (members[0].sync if members else LocalSync())
    if not members:
        return members
    lead = members[0]
    batches_seen = lead.step * lead.accumulation
    for m in members:
        if m.step * m.accumulation != batches_seen:
            raise ValueError(
                "members of one fit must start at the same position in the stream "
                f"({m.name} is at batch {m.step * m.accumulation}, {lead.name} at {batches_seen})"
            )
    every = [m.cfg.checkpoint_every_seconds for m in members if m.cfg.checkpoint_every_seconds > 0]
    timer = CheckpointTimer(min(every) if every else 0.0)
    total_tokens = max(m.total_steps * m.accumulation for m in members) * lead.batch_tokens * sync.world_size
    reporter.start(total_tokens, batches_seen * lead.batch_tokens * sync.world_size)
    pending = False
    warned: set[int] = set()
    it = iter(stream)
    with _StopFlag(handle_signals) as stop:
        while True:
            alive = [m for m in members if m.running]
            if not alive:
                break
            stop_now, time_due = stop.signum is not None, timer.due()
            flags = sync.any_rank(torch.tensor([int(stop_now), int(time_due)]))  # every rank decides alike
            stop_now, time_due = bool(flags[0] > 0), bool(flags[1] > 0)
            pending = pending or time_due
            if (pending or stop_now) and all(m.at_boundary for m in alive):
                checkpoint_all(stream, members, sync, batches_seen)
                pending = False
                timer.reset()
                if stop_now:
                    steps = ", ".join(f"{m.name} step {m.step}" for m in alive)
                    raise KeyboardInterrupt(f"interrupted; checkpoint saved ({steps})")
            try:
                batch = next(it)
            except StopIteration:
                for m in alive:
                    m.status = "stopped"
                    m.message = (
                        f"{m.name}: the activation stream ended after {m.step} of {m.total_steps} steps; "
                        "the dictionary was saved as it is (generate a larger cache or lower "
                        "trainer.total_training_tokens)"
                    )
                    reporter.warn(m.message)
                break
            moved: dict[tuple, Batch] = {}
            stepped = []
            for m in alive:
                key = (m.device, m.input_dtype)
                if key not in moved:
                    moved[key] = batch.to(m.device, m.input_dtype)
                if m.feed(moved[key]):
                    stepped.append(m)
            batches_seen += 1
            # planned tokens per batch, the unit of start()'s total (a masked or filtered batch holds fewer):
            # the bar ends exactly at its total
            reporter.advance(lead.batch_tokens * sync.world_size)
            for m in stepped:
                if m.should_log() and m.check_finite():
                    rec = m.metrics()
                    if sync.is_main:
                        m.write_metrics(rec)
                    reporter.log(m.name, rec)
                if m.running and m.step >= m.total_steps and m.check_finite():
                    m.status = "finished"
                if m.status != "diverged" and m.wants_checkpoint():
                    pending = True
            if pending and all(m.at_boundary for m in members if m.running):
                checkpoint_all(stream, members, sync, batches_seen)
                pending = False
                timer.reset()
            _report_diverged(members, reporter, warned)
    _report_diverged(members, reporter, warned)
    return members


def _report_diverged(members: list[Member], reporter: Reporter, warned: set[int]) -> None:
    """Warn once per diverged member while others go on (a lone member's caller raises instead)."""
    if len(members) < 2:
        return
    for m in members:
        if m.status == "diverged" and id(m) not in warned:
            warned.add(id(m))
            reporter.warn(m.message)
