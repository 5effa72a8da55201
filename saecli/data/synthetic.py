"""A synthetic activation stream with a known answer, for tests and for checking a trainer.

Each token is a sparse non-negative combination of `k` atoms drawn from a fixed random dictionary
(`true_dictionary`, [n_atoms, d_model], unit rows), plus an optional offset and noise — the setting in
which a TopK SAE with d_sae ≥ n_atoms should recover the atoms. Batch i is generated from its own
seed (seed, i, rank), so the stream's state is just the next batch index: `state_dict()` /
`load_state_dict()` are exact, and data-parallel ranks get disjoint batches.

    stream = SyntheticStream(d_model=32, n_atoms=64, k=4, batch_size=256, n_batches=500)
    for batch in stream: ...                     # Batch(acts={"synthetic.0": [256, 32]}, tokens, ...)

Extra hook points get a fixed random linear map of the first one (a target for transcoder-like kinds).
`nan_batches` makes chosen batches NaN (to test divergence handling). `contexts=True` yields
[B, T, d] windows with a mask that drops position 0 (like a BOS token).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from saecli.data.batch import Batch

if TYPE_CHECKING:
    from saecli.lm.loading import LanguageModel


class SyntheticStream:
    """Seeded sparse combinations of a known dictionary; implements the ActivationStream protocol."""

    lm: LanguageModel | None = None  # no model behind synthetic data
    dropped_tokens: int = 0  # nothing is dropped

    def __init__(
        self,
        *,
        d_model: int = 32,
        n_atoms: int = 64,
        k: int = 4,
        batch_size: int = 256,
        n_batches: int | None = None,
        hook_points: Sequence[str] = ("synthetic.0",),
        seed: int = 0,
        scale: float = 1.0,
        offset: float = 0.0,
        noise: float = 0.0,
        mean_norms: dict[str, float] | None = None,
        contexts: bool = False,
        context_size: int = 16,
        nan_batches: Sequence[int] = (),
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int = 512,
    ):
        if k > n_atoms:
            raise ValueError(f"k ({k}) must be <= n_atoms ({n_atoms})")
        self.hook_points = list(hook_points)
        self.d_model = {h: d_model for h in self.hook_points}
        self.mean_norms = mean_norms
        self.contexts = contexts
        self.context_size = context_size
        self.batch_size = batch_size
        self.n_batches = n_batches
        self.k, self.n_atoms, self.seed = k, n_atoms, seed
        self.scale, self.noise = scale, noise
        self.nan_batches = set(nan_batches)
        self.rank, self.world_size = rank, world_size
        self.vocab_size = vocab_size
        g = torch.Generator().manual_seed(seed)
        atoms = torch.randn(n_atoms, d_model, generator=g)
        self.true_dictionary = atoms / atoms.norm(dim=-1, keepdim=True)
        self.offset = offset * torch.randn(d_model, generator=g)
        self.maps = {h: torch.randn(d_model, d_model, generator=g) / d_model**0.5 for h in self.hook_points[1:]}
        self.position = 0  # index of the next batch on this rank

    # ------------------------------------------------------------------ generation
    def _generator(self, index: int) -> torch.Generator:
        global_index = index * self.world_size + self.rank
        return torch.Generator().manual_seed((self.seed * 1_000_003 + global_index * 7919 + 17) % 2**63)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n tokens: k distinct atoms each, coefficients uniform in [0.5, 1.5] × scale."""
        choice = torch.rand(n, self.n_atoms, generator=generator).topk(self.k, dim=-1).indices
        coef = 0.5 + torch.rand(n, self.k, generator=generator)
        x = torch.einsum("nk,nkd->nd", coef, self.true_dictionary[choice]) * self.scale + self.offset
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=generator)
        return x

    def make_batch(self, index: int) -> Batch:
        g = self._generator(index)
        shape = (self.batch_size, self.context_size) if self.contexts else (self.batch_size,)
        n = int(torch.tensor(shape).prod())
        x = self.sample(n, g)
        if index in self.nan_batches:
            x = torch.full_like(x, float("nan"))
        acts = {self.hook_points[0]: x}
        for h, m in self.maps.items():
            acts[h] = x @ m
        acts = {h: a.reshape(*shape, -1) for h, a in acts.items()}
        tokens = torch.randint(3, self.vocab_size, shape, generator=g)
        if self.contexts:
            pos = torch.arange(self.context_size).expand(shape).clone()
            doc = (index * self.batch_size + torch.arange(self.batch_size))[:, None].expand(shape).clone()
            mask = pos > 0
            return Batch(acts=acts, tokens=tokens, doc=doc, pos=pos, mask=mask)
        start = index * self.batch_size
        return Batch(
            acts=acts, tokens=tokens, doc=torch.arange(start, start + n) // 64, pos=torch.arange(start, start + n) % 64
        )

    # ------------------------------------------------------------------ ActivationStream
    def __iter__(self) -> Iterator[Batch]:
        while self.n_batches is None or self.position < self.n_batches:
            batch = self.make_batch(self.position)
            self.position += 1
            yield batch

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"state is for seed {state['seed']}, this stream has seed {self.seed}")
        self.position = int(state["position"])

    def close(self) -> None:
        """Nothing runs in the background."""
