"""The line a multi-process run prints at start: how many processes on how many machines, the device
mesh, and what one rank computes per step — what to check first when a multi-node launch misbehaves
(a machine missing from the rendezvous shows as a smaller world size; see README "Many machines").

    world size 4 (2 machines × 2 processes) · mesh dp=4 · per rank 256 tokens × 2 accumulation steps per step

Machines = WORLD_SIZE / LOCAL_WORLD_SIZE (what torchrun and `accelerate launch` set in every process).
The mesh is data-parallel only unless a caller gives its axes (e.g. {"dp": 2, "tp": 2}).
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def machines(world_size: int, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(machines, processes per machine) from the launcher's environment; (1, world_size) without one."""
    env = os.environ if env is None else env
    local = int(env.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    local = max(1, min(local, world_size))
    return max(1, world_size // local), local


def topology_line(
    world_size: int,
    batch_tokens: int,
    accumulation: int = 1,
    *,
    mesh: Mapping[str, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """One line: world size (machines × processes), mesh shape, per-rank batch (see the module docstring)."""
    n_machines, local = machines(world_size, env)
    axes = dict(mesh) if mesh else {"dp": world_size}
    shape = " × ".join(f"{k}={v}" for k, v in axes.items())
    acc = f" × {accumulation} accumulation steps" if accumulation > 1 else ""
    return (
        f"world size {world_size} ({n_machines} machine{'s' if n_machines > 1 else ''} × {local} "
        f"process{'es' if local > 1 else ''}) · mesh {shape} · per rank {batch_tokens:,} tokens{acc} per step"
    )
