"""Training: one loop (`fit`) for any dictionary and any number of members on one stream.

Plain dataclasses, tensors and callbacks only (no experiment files, store or terminal), so it can be
used from Python on any stream of `Batch`:

    from saecli.training import Member, fit, initialize, plan_steps
    tokens = initialize(stream, [(dictionary, init_cfg)])
    plan = plan_steps(total_tokens, tokens)
    fit(stream, [Member(dictionary, trainer_cfg, total_steps=plan.total_steps, batch_tokens=plan.batch_tokens)])

A whole experiment (config.toml, checkpoints, summary, store, wandb) is `saecli.runs.train(exp)`.
"""

from saecli.training.member import Member
from saecli.training.schedules import Schedule
from saecli.training.trainer import NullReporter, Reporter, fit, initialize, plan_steps

__all__ = ["Member", "NullReporter", "Reporter", "Schedule", "fit", "initialize", "plan_steps"]
