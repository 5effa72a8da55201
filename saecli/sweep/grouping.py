"""Which members can share one activation stream, and how groups are spread over processes.

Two members can be fed the same batches when every config key flagged `stream=True` in the schema
(`saecli.config.base.stream_keys`: model, dataset, hook points, context and batch sizes, total tokens,
the stream's seed...) has the same value for both, and both kinds read tokens (or both whole
contexts). Everything else (lr, k, d_sae, activation, sparsity terms, schedules, init, seed...) may
differ inside a group. Nothing here lists keys by hand: a new stream key in the schema regroups
sweeps by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from saecli.config.base import stream_keys
from saecli.config.experiment import Experiment
from saecli.sweep.grid import SweepMember, key_value


@dataclass
class Group:
    index: int
    members: list[SweepMember]
    key: tuple  # the stream-defining values, in `stream_key_paths()` order


@dataclass
class Unit:
    """What one process trains: some members of one group (all of them unless a group was split)."""

    group: Group
    members: list[SweepMember] = field(default_factory=list)


def stream_key_paths() -> list[str]:
    return sorted(stream_keys(Experiment))


def needs_context(exp: Any) -> bool:
    """Whether the member's kind reads whole contexts (LORSA) rather than shuffled tokens."""
    if exp.dictionary is None:
        return False
    from saecli.dictionaries.registry import dictionary_class

    return bool(dictionary_class(exp.dictionary.kind).needs_context)


def stream_signature(exp: Any, paths: list[str] | None = None) -> tuple:
    paths = paths if paths is not None else stream_key_paths()
    return tuple(repr(key_value(exp, p)) for p in paths) + (needs_context(exp),)


def group_members(members: list[SweepMember]) -> list[Group]:
    """Members with equal stream signatures form one group (in the order members first appear)."""
    paths = stream_key_paths()
    groups: dict[tuple, Group] = {}
    for m in members:
        key = stream_signature(m.exp, paths)
        if key not in groups:
            groups[key] = Group(index=len(groups), members=[], key=key)
        groups[key].members.append(m)
    return list(groups.values())


def differing_stream_keys(groups: list[Group]) -> list[str]:
    """The stream keys whose values tell the groups apart (for --dry-run)."""
    paths = stream_key_paths() + ["(whole contexts)"]
    return [p for i, p in enumerate(paths) if len({g.key[i] for g in groups}) > 1]


def spread(groups: list[Group], world_size: int, can_split: bool = True) -> list[list[Unit]]:
    """Units of work per rank, balanced by cost (longest first onto the least loaded rank).

    When there are fewer groups than ranks, the biggest groups are split into parts of members (each
    part reads the whole stream itself) until every rank has work or no group has members to spare.
    The result is the same on every rank (a pure function of the plan).
    """
    units = [Unit(g, list(g.members)) for g in groups]
    if can_split:
        while len(units) < world_size:
            big = max(units, key=lambda u: (len(u.members), -u.group.index))
            if len(big.members) < 2:
                break
            half = len(big.members) // 2
            units.remove(big)
            units += [Unit(big.group, big.members[:half]), Unit(big.group, big.members[half:])]
    units.sort(key=lambda u: (-_unit_cost(u), u.group.index, u.members[0].index))
    loads = [0] * world_size
    plan: list[list[Unit]] = [[] for _ in range(world_size)]
    for u in units:
        r = min(range(world_size), key=lambda i: (loads[i], i))
        plan[r].append(u)
        loads[r] += _unit_cost(u)
    for per_rank in plan:
        per_rank.sort(key=lambda u: (u.group.index, u.members[0].index))
    return plan


def _unit_cost(u: Unit) -> int:
    """One stream pass (the dominant cost on a live model) plus a share per member."""
    tokens = int(u.group.members[0].exp.trainer.total_training_tokens)
    return tokens * (4 + len(u.members))
