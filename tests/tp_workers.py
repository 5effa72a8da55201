"""Workers of the tensor-parallel tests (tests/test_tensor_parallel.py): each runs in its own process,
spawned by torch.multiprocessing, in a gloo process group. The same code trains the unsharded reference
in the test process itself (no process group at all)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.config.trainer import TrainerConfig
from saecli.data.batch import Batch
from saecli.dictionaries.registry import build_dictionary
from saecli.training.member import Member

HIN, HOUT = "blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out"
HIN1, HOUT1 = "blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out"  # a CLT's second layer
CLT_HOOKS = [HIN, HIN1, HOUT, HOUT1]
D_MODEL, D_SAE, N_TOK, STEPS = 16, 64, 64, 50
MOLT_RANKS = {"1": 32, "2": 16, "4": 16}  # a MOLT's 64 transforms

CASES: dict[str, dict[str, Any]] = {
    "topk": {"kind": "sae", "activation": "topk", "k": 4},
    "batchtopk": {"kind": "sae", "activation": "batchtopk", "k": 4},
    "topk-dense": {"kind": "sae", "activation": "topk", "k": 4, "sparse_kernels": False},  # the dense reference
    "relu": {"kind": "sae", "activation": "relu"},
    "jumprelu": {"kind": "sae", "activation": "jumprelu", "jumprelu_threshold_init": 0.05},
    "transcoder": {
        "kind": "transcoder",
        "activation": "topk",
        "k": 4,
        "skip_connection": True,
        "hook_point_in": HIN,
        "hook_point_out": HOUT,
    },
    "crosscoder": {"kind": "crosscoder", "activation": "batchtopk", "k": 4, "hook_points": [HIN, HOUT]},
    # d_sae is per layer: 32 latents × 2 layers; layers keep different k (one all-gather for both)
    "clt": {
        "kind": "clt",
        "activation": "topk",
        "k": 4,
        "layer_k": [4, 2],
        "d_sae": 32,
        "hook_points_in": [HIN, HIN1],
        "hook_points_out": [HOUT, HOUT1],
    },
    # 64 transforms of ranks 1, 2, 4 (R = 128 factor rows); tp = 2 deals each rank group half and half
    "molt": {"kind": "molt", "activation": "topk", "k": 4, "rank_counts": MOLT_RANKS, "hook_point_in": HIN},
    # the dense path (JumpReLU), thresholds split with the gate rows, each rank renormalising its own U_i V_i
    "molt-jumprelu": {
        "kind": "molt",
        "activation": "jumprelu",
        "jumprelu_threshold_init": 0.05,
        "decoder_unit_norm": True,
        "rank_counts": MOLT_RANKS,
        "hook_point_in": HIN,
    },
    "molt-batchtopk": {
        "kind": "molt",
        "activation": "batchtopk",
        "k": 4,
        "rank_counts": MOLT_RANKS,
        "hook_point_in": HIN,
    },
    "clt-batchtopk": {
        "kind": "clt",
        "activation": "batchtopk",
        "k": 3,
        "d_sae": 32,
        "hook_points_in": [HIN, HIN1],
        "hook_points_out": [HOUT, HOUT1],
    },
}


def hooks(case: str) -> list[str]:
    kind = CASES[case]["kind"]
    return [HIN] if kind == "sae" else CLT_HOOKS if kind == "clt" else [HIN, HOUT]


def trainer_cfg(**kw: Any) -> TrainerConfig:
    # a short dead window so AuxK has dead latents to work on; clipping exercises the norm over shards
    return parse(
        TrainerConfig,
        {
            "total_training_tokens": N_TOK * STEPS,
            "lr": 5e-3,
            "lr_warm_up_steps": 0,
            "log_frequency": 10,
            "n_checkpoints": 0,
            "checkpoint_every_seconds": 0,
            "dead_threshold_tokens": N_TOK * 3,
            "clip_grad_norm": 1.0,
            **kw,
        },
    )


def dictionary(case: str) -> Any:
    torch.manual_seed(0)
    cfg = parse(DictionaryConfig, {"d_sae": D_SAE, "norm_activation": "none", **CASES[case]}, key="sae")
    return build_dictionary(cfg, D_MODEL, hooks(case))


def batch(case: str, step: int) -> Batch:
    """Step `step`'s batch: a few strong directions so that latents specialise (and some die)."""
    g = torch.Generator().manual_seed(1000 + step)
    basis = torch.randn(8, D_MODEL, generator=torch.Generator().manual_seed(7))
    codes = torch.relu(torch.randn(N_TOK, 8, generator=g)) ** 2
    x = codes @ basis + 0.05 * torch.randn(N_TOK, D_MODEL, generator=g)
    acts = {HIN: x}
    if CASES[case]["kind"] != "sae":
        acts[HOUT] = torch.tanh(x) @ torch.randn(D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(8)) * 0.3
    if CASES[case]["kind"] == "clt":
        acts[HIN1] = x + acts[HOUT]
        acts[HOUT1] = (
            torch.tanh(acts[HIN1]) @ torch.randn(D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(9)) * 0.3
        )
    return Batch(acts=acts, tokens=torch.zeros(N_TOK, dtype=torch.long))


def active(member: Member, feature_acts: torch.Tensor) -> torch.Tensor:
    """[N, d_sae] bool: the latents that fired on each token (gathered over shards)."""
    f = feature_acts.to_dense() if feature_acts.is_sparse or feature_acts.layout != torch.strided else feature_acts
    on = (f.detach() != 0).to(torch.int32)
    shard = getattr(member.dictionary, "latent_shard", None)
    return (shard.gather_latents(on) if shard is not None else on).bool()


def recorded(cls: type[Member]) -> type[Member]:
    """`cls` that also keeps, every step, which latents fired on which token."""

    class Recorded(cls):  # type: ignore[misc,valid-type]
        def latent_counts(self, feature_acts: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            self.fired = getattr(self, "fired", [])
            self.fired.append(active(self, feature_acts))
            return super().latent_counts(feature_acts, mask)

    return Recorded


def train(member: Member, case: str, start: int, stop: int) -> None:
    """Steps [start, stop); keeps each step's raw AuxK loss in `member.aux` (0 when no latent is dead)."""
    member.aux = getattr(member, "aux", [])
    for step in range(start, stop):
        assert member.feed(batch(case, step))
        member.aux.append(float(member._last_extra.get("raw/aux", 0.0)))


def full_state(d: Any) -> dict[str, torch.Tensor]:
    from saecli.training.tensor_parallel import unshard

    plain = unshard(d) if getattr(d, "latent_shard", None) is not None else d
    if plain is None:
        return {}
    return {k: v.detach().clone() for k, v in plain.state_dict().items()}


def reference(case: str, steps: int = STEPS) -> dict[str, Any]:
    d = dictionary(case)
    m = recorded(Member)(d, trainer_cfg(), total_steps=STEPS, batch_tokens=N_TOK)
    train(m, case, 0, steps)
    from saecli.training.tensor_parallel import state_bytes

    return {"state": full_state(d), "fired": m.fired, "bytes": state_bytes(d, m.optimizer), "aux": m.aux}


# ------------------------------------------------------------------------------------ in the workers
def _init(rank: int, world: int, store: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def sharded_runs(rank: int, world: int, store: str, out: str, tp: int, cases: list[str] | None = None) -> None:
    """Every case (or `cases`) trained 50 steps with tp ranks; results (rank 0) to `out`/<case>.pt."""
    import torch.distributed as dist

    from saecli.training.tensor_parallel import ShardedMember, make_mesh, shard_dictionary, state_bytes

    _init(rank, world, store)
    mesh = make_mesh(tp)
    for case in cases or CASES:
        d = shard_dictionary(dictionary(case), mesh)
        m = recorded(ShardedMember)(d, trainer_cfg(), mesh=mesh, total_steps=STEPS, batch_tokens=N_TOK)
        train(m, case, 0, STEPS)
        state = full_state(d)
        if rank == 0:
            torch.save(
                {
                    "state": state,
                    "fired": m.fired,
                    "bytes": state_bytes(d, m.optimizer),
                    "aux": m.aux,
                    "world": dist.get_world_size(),
                    "mesh": tuple(mesh.shape),
                },
                Path(out) / f"{case}.pt",
            )
    if cases is None:
        data_parallel_runs(rank, world, out)
    dist.destroy_process_group()


def data_parallel_runs(rank: int, world: int, out: str) -> None:
    """The ("dp", "tp") = (world, 1) mesh against today's data parallel (`TorchSync`): each rank its own
    batches; rank 0 saves both results to `out`/dp.pt (called from `sharded_runs`)."""
    from saecli.training.distributed import TorchSync
    from saecli.training.tensor_parallel import ShardedMember, make_mesh, shard_dictionary

    case, states = "topk", {}
    for name in ("today", "sharded"):
        if name == "sharded":
            mesh = make_mesh(1)
            d = shard_dictionary(dictionary(case), mesh)
            m: Member = ShardedMember(d, trainer_cfg(), mesh=mesh, total_steps=STEPS, batch_tokens=N_TOK)
        else:
            d = dictionary(case)
            m = Member(d, trainer_cfg(), total_steps=STEPS, batch_tokens=N_TOK, sync=TorchSync())
        for step in range(STEPS):
            m.feed(batch(case, world * step + rank))
        states[name] = full_state(d)
    if rank == 0:
        torch.save({**states, "mesh": tuple(mesh.shape)}, Path(out) / "dp.pt")


def two_d_runs(rank: int, world: int, store: str, out: str) -> None:
    """4 processes on a ("dp", "tp") = (2, 2) mesh: each dp group reads the batches `data_parallel_runs`
    gives its dp rank; rank 0 saves the gathered weights to `out`/2d.pt."""
    import torch.distributed as dist

    from saecli.training.tensor_parallel import ShardedMember, make_mesh, shard_dictionary

    _init(rank, world, store)
    mesh = make_mesh(2)
    case = "topk"
    d = shard_dictionary(dictionary(case), mesh)
    m = ShardedMember(d, trainer_cfg(), mesh=mesh, total_steps=STEPS, batch_tokens=N_TOK)
    dp_rank, dp_size = m.sync.rank, m.sync.world_size
    for step in range(STEPS):
        m.feed(batch(case, dp_size * step + dp_rank))
    state = full_state(d)
    if rank == 0:
        torch.save({"state": state, "mesh": tuple(mesh.shape), "dp": (dp_rank, dp_size)}, Path(out) / "2d.pt")
    dist.destroy_process_group()


def resume_runs(rank: int, world: int, store: str, out: str, tp: int, case: str = "topk") -> None:
    """2 → 1: 25 steps with tp ranks, a DCP checkpoint; 1 → 2: resume the unsharded checkpoint the test
    process wrote in `out`/plain and go on to 50 steps; 2 → 2: the DCP checkpoint resumed sharded (rank 0
    writes the weights)."""
    import torch.distributed as dist

    from saecli.training.checkpoint import latest_checkpoint
    from saecli.training.tensor_parallel import ShardedMember, make_mesh, shard_dictionary

    _init(rank, world, store)
    mesh = make_mesh(tp)
    d = shard_dictionary(dictionary(case), mesh)
    m = ShardedMember(d, trainer_cfg(), mesh=mesh, total_steps=STEPS, batch_tokens=N_TOK, folder=Path(out) / "sharded")
    train(m, case, 0, STEPS // 2)
    m.save_checkpoint({"stream": [None], "rng": None, "batches_seen": STEPS // 2})
    # 1 → 2: the unsharded run's checkpoint at step 25, resumed sharded
    d2 = shard_dictionary(dictionary(case), mesh)
    path = latest_checkpoint(Path(out) / "plain")[1]
    m2, _ = ShardedMember.from_checkpoint(d2, trainer_cfg(), path, mesh=mesh)
    resumed = [m2.step]
    train(m2, case, m2.step, STEPS)
    state = full_state(d2)
    # 2 → 2: the sharded checkpoint resumed sharded (DCP into DTensors)
    d3 = shard_dictionary(dictionary(case), mesh)
    m3, _ = ShardedMember.from_checkpoint(d3, trainer_cfg(), latest_checkpoint(Path(out) / "sharded")[1], mesh=mesh)
    resumed.append(m3.step)
    train(m3, case, m3.step, STEPS)
    state3 = full_state(d3)
    if rank == 0:
        torch.save({"state": state, "step_resumed": resumed[0]}, Path(out) / "one_to_two.pt")
        torch.save({"state": state3, "step_resumed": resumed[1]}, Path(out) / "two_to_two.pt")
    dist.barrier()
    dist.destroy_process_group()


def spawn(fn: Any, world: int, tmp: Path, *args: Any) -> None:
    import torch.multiprocessing as mp

    store = tmp / f"store-{fn.__name__}"
    mp.start_processes(fn, args=(world, str(store), str(tmp), *args), nprocs=world, start_method="spawn")
