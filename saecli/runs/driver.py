"""The one run driver: members that start at the same position of one stream, trained in one pass.

    jobs = prepare([Job(exp, folder)], sync=sync, reporter=reporter)    # config.toml written, paths absolute
    results = train_pass(jobs, stream, sync=sync, reporter=reporter)    # one RunResult per member

`saecli train` is a pass of one member whose `sync` spans the data-parallel ranks (each rank its shard
of the stream, gradients all-reduced: training/distributed.py); `saecli sweep` makes one or two
passes per group of members sharing a stream, each on one process (`LocalSync`). Either way a member
is built, initialised, resumed, trained, saved, recorded and evaluated by the same code below, so a
member's weights do not depend on which command trained it (tests/test_runs_driver.py checks it bit
for bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saecli.config.defaults import resolved_for_run
from saecli.config.experiment import Experiment
from saecli.config.load import write_resolved
from saecli.data.stream import ActivationStream
from saecli.runs.folders import CONFIG_FILE, clear_run_partial, config_changes
from saecli.runs.members import ModelForInit, Replay, dictionary_config, fresh_member, resumed_member
from saecli.runs.outputs import evaluate_member, finish, record_in_store, run_header
from saecli.training.distributed import Sync
from saecli.training.member import Member, set_rng_state
from saecli.training.trainer import Reporter, fit

if TYPE_CHECKING:
    from saecli.lm.loading import LanguageModel


@dataclass
class Job:
    """One member to train: its experiment, its folder, and the checkpoint it resumes from (None: fresh)."""

    exp: Experiment
    folder: Path
    checkpoint: tuple[int, Path] | None = None


@dataclass
class RunResult:
    """What training one member gave: its folder and its final metrics (summary.json's content)."""

    name: str
    folder: Path
    summary: dict[str, Any]

    @property
    def status(self) -> str:
        """finished | stopped (the stream ended first; saved as it is) | diverged (NaN/inf; nothing saved)."""
        return str(self.summary.get("status", "finished"))


def prepare(jobs: list[Job], *, sync: Sync, reporter: Reporter) -> list[Job]:
    """The jobs with their experiments as config.toml records them (absolute paths, an imported cache as
    the data source), that config.toml written (by the writing rank), and a warning when a resumed member's
    settings differ from the ones it started with."""
    from saecli.config.load import absolute_paths
    from saecli.fsio import require_writable
    from saecli.interop.activations import cache_data_source

    ready = []
    for job in jobs:
        exp = cache_data_source(absolute_paths(job.exp))
        if sync.is_main:
            require_writable(job.folder, "the run folder")
            if job.checkpoint is not None and (job.folder / CONFIG_FILE).exists():
                changed = config_changes(job.folder / CONFIG_FILE, exp)
                if changed:
                    reporter.warn(
                        f"{exp.run.name}: resuming with settings that differ from its config.toml: "
                        + ", ".join(changed)
                        + " (the checkpoint's step count and schedules are kept)"
                    )
            job.folder.mkdir(parents=True, exist_ok=True)
            write_resolved(exp, job.folder)
        ready.append(Job(exp, job.folder, job.checkpoint))
    sync.barrier()
    return ready


def train_pass(
    jobs: list[Job],
    stream: ActivationStream,
    *,
    sync: Sync,
    reporter: Reporter,
    lm: LanguageModel | None = None,
    evaluate: bool = False,
    given: bool = False,
) -> list[RunResult]:
    """Train `jobs` (all fresh, or all resuming from checkpoints at one stream position) on one pass of
    `stream`; save, record and (when `evaluate`) evaluate each member that did not diverge.

    `lm`: the language model, when the caller has one (for kinds initialised from it, and eval); else the
    live stream's, else loaded on first need. `given`: the stream came from the caller (the header says so).
    """
    model = ModelForInit(lm if lm is not None else stream.lm)
    members: list[Member] = []
    try:
        if jobs[0].checkpoint is None:
            replay = Replay(stream, max(int(job.exp.init.init_batches) for job in jobs))  # read once for all
            for job in jobs:
                if sync.is_main:
                    clear_run_partial(job.folder)
                members.append(fresh_member(job.exp, job.folder, stream, replay, sync=sync, model=model))
        else:
            shared: dict[str, Any] = {}
            paths = [job.checkpoint[1] for job in jobs if job.checkpoint is not None]
            assert len(paths) == len(jobs), "a pass is all fresh or all resumed"
            for job, path in zip(jobs, paths):
                member, state = resumed_member(job.exp, job.folder, path, stream, sync=sync)
                members.append(member)
                shared = shared or state
            stream.load_state_dict(shared["stream"][sync.rank])
            set_rng_state(shared["rng"])
            reporter.info(
                "resuming "
                + ", ".join(f"{m.name} from step {m.step} of {m.total_steps}" for m in members)
                + (f" ({paths[0]})" if len(paths) == 1 else "")
            )
        # every default resolved now that the stream gave d_model and the step plan: config.toml and the store
        # record what each member trains with (saecli.config.defaults)
        jobs = [
            Job(resolved_for_run(job.exp, m.cfg, m.dictionary.d_model), job.folder, job.checkpoint)
            for job, m in zip(jobs, members)
        ]
        if sync.is_main:
            for job in jobs:
                write_resolved(job.exp, job.folder)
        lines = [line for job, m in zip(jobs, members) for line in run_header(job.exp, stream, m, given=given)]
        for line in dict.fromkeys(lines):  # the cache note once per pass
            reporter.info(line)
        fit(stream, members, reporter=reporter, sync=sync)
        results = []
        for job, m in zip(jobs, members):
            if m.status == "diverged":  # it wrote diverged.json; its last good checkpoint stays
                results.append(RunResult(m.name, job.folder, m.summary()))
                continue
            summary = finish(m, fold=dictionary_config(job.exp).fold_activation_scale)
            if sync.is_main:
                record_in_store(job.exp, job.folder, summary, reporter)
                if evaluate:
                    evaluate_member(job.exp, job.folder, model.lm, reporter)
            results.append(RunResult(m.name, job.folder, summary))
    finally:
        for m in members:
            m.close()
    dropped = stream.dropped_tokens
    if dropped and sync.is_main:
        reporter.info(f"{dropped:,} massive-activation tokens left out of training (activations.max_norm_ratio)")
    return results
