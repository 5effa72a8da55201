"""`LiveStream`: the same batches as a cache, computed on the fly from a model and a text source.

A window is C contexts (C = shuffle_buffer_tokens / context_size, rounded up to whole model batches;
one model batch when unshuffled, as eval streams are):
the model runs (truncated after the deepest hook) on them, the kept tokens are flattened and permuted
together, and batches are cut across windows exactly as for the cache (shuffle.py). The state is
(epoch, window, offset): a resumed stream re-tokenises to skip window·C contexts and runs the model
only on the current window. With `contexts=True` the rows are whole contexts ([B, T, d] with a mask,
for LORSA): contexts are shuffled within a window, positions never are.

Data-parallel rank r of world_size reads the documents whose index is r modulo world_size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from saecli.config.activations import ActivationsConfig
from saecli.config.dataset import DatasetConfig
from saecli.data.batch import Batch
from saecli.data.manifest import act_key
from saecli.data.shuffle import Rows, Window, WindowStream, permutation
from saecli.data.text import iter_documents
from saecli.data.tokens import Packer, packer_for
from saecli.dtypes import DTYPES
from saecli.errors import UsageError

if TYPE_CHECKING:
    from saecli.config.model import ModelConfig
    from saecli.lm.loading import LanguageModel


class LiveStream(WindowStream):
    """Activation batches computed from a loaded model; implements saecli.data.stream.ActivationStream."""

    def __init__(
        self,
        lm: LanguageModel,
        dataset: DatasetConfig,
        acts: ActivationsConfig,
        *,
        hook_points: list[str] | None = None,
        contexts: bool = False,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        run_to_hooks: Callable | None = None,
        packer: Packer | None = None,
        model_cfg: ModelConfig | None = None,
    ):
        if run_to_hooks is None:
            from saecli.lm import run_to_hooks as model_forward

            run_to_hooks = model_forward
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside [0, world_size={world_size})")
        self.lm = lm
        self.dataset = dataset
        self.hook_points = list(hook_points or acts.hook_points)
        self.contexts = contexts
        self.rank, self.world_size = rank, world_size
        self.epochs = epochs
        self.seed = acts.seed
        self.shuffle = acts.shuffle
        self.max_norm_ratio = float(acts.max_norm_ratio)
        self.model_batch_size = acts.model_batch_size
        self.context_size = acts.context_size
        self.dtype = DTYPES[acts.override_dtype] if acts.override_dtype else None
        self.packer = packer or packer_for(lm, acts, model_cfg)
        self._run: Callable[..., dict[str, torch.Tensor]] = run_to_hooks
        per_batch = acts.context_size * acts.model_batch_size
        # unshuffled, a window is one model batch: the first batch comes after one forward, not a buffer's worth
        buffered = max(1, math.ceil(acts.shuffle_buffer_tokens / per_batch)) if self.shuffle else 1
        self.window_contexts = acts.model_batch_size * buffered
        self.batch_rows = max(1, acts.batch_size // acts.context_size) if contexts else acts.batch_size
        from saecli.lm.hooks import hook_width

        # d_model wide, except attn.hook_z (n_heads · d_head)
        self.d_model = {
            h: hook_width(lm, h) if h.endswith(".attn.hook_z") else int(lm.d_model) for h in self.hook_points
        }
        self._norms: dict[str, float] | None = None
        self._docs_seen = dataset.skip_documents
        self._source: tuple[tuple[int, int], Any] | None = None  # ((epoch, next window), contexts iterator)
        self._init_cursor()

    # -- ActivationStream extras
    @property
    def mean_norms(self) -> dict[str, float] | None:
        """Mean ‖x‖ per hook over this rank's first window (computed on first use)."""
        if self._norms is None:
            self._get(0, 0)
        return self._norms

    def documents_consumed(self) -> int:
        """A `skip_documents` past every document this stream has read so far."""
        return self._docs_seen

    # -- windows
    def _contexts_from(self, epoch: int, window: int):
        if self._source is None or self._source[0] != (epoch, window):
            docs = iter_documents(self.dataset, self.rank, self.world_size)
            it = self.packer.contexts(docs, self.model_batch_size, skip=window * self.window_contexts)
            self._source = ((epoch, window), it)
        return self._source[1]

    def _load(self, epoch: int, window: int) -> Window | None:
        it = self._contexts_from(epoch, window)
        pieces: list[Rows] = []
        pulled = 0
        while pulled < self.window_contexts:
            ctx = next(it, None)
            if ctx is None:
                break
            pulled += len(ctx)
            pieces.append(self._forward(ctx))
        self._source = ((epoch, window + 1), it)
        if not pieces:
            return None
        rows = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
        self._docs_seen = max(self._docs_seen, int(rows["doc"].max()) + 1)
        n = int(rows["tokens"].shape[0])
        if self._norms is None and (epoch, window) == (0, 0):
            self._norms = self._mean_norms(rows)
        return Window(rows, permutation(n, self.seed, epoch, window, self.rank) if self.shuffle else None, n)

    def _forward(self, ctx) -> Rows:
        device = self.lm.device
        out = self._run(self.lm, ctx.tokens.to(device), self.hook_points)
        if self.contexts:
            rows = {act_key(h): out[h] if self.dtype is None else out[h].to(self.dtype) for h in self.hook_points}
            rows.update(tokens=ctx.tokens, doc=ctx.doc, pos=ctx.pos.long(), mask=ctx.mask)
            return {k: v.to(device) for k, v in rows.items()}
        keep = ctx.kept()
        keep_dev = keep.to(device)
        rows = {}
        for h in self.hook_points:
            a = out[h].reshape(-1, out[h].shape[-1]).index_select(0, keep_dev)
            rows[act_key(h)] = a if self.dtype is None else a.to(self.dtype)
        for name, t in (("tokens", ctx.tokens), ("doc", ctx.doc), ("pos", ctx.pos.long())):
            rows[name] = t.reshape(-1)[keep].to(device)
        return rows

    def _mean_norms(self, rows: Rows) -> dict[str, float]:
        out = {}
        for h in self.hook_points:
            a = rows[act_key(h)]
            norms = torch.linalg.vector_norm(a.float(), dim=-1)
            if self.contexts:
                norms = norms[rows["mask"]]
            out[h] = float(norms.double().mean()) if norms.numel() else 0.0
        return out

    def _to_batch(self, rows: Rows) -> Batch:
        acts = {h: rows[act_key(h)] for h in self.hook_points}
        return Batch(acts, rows["tokens"], rows["doc"], rows["pos"], rows.get("mask"))

    # -- exact position
    def _identity(self) -> dict:
        return {
            "kind": "live",
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_rows": self.batch_rows,
            "contexts": self.contexts,
            "rank": self.rank,
            "world_size": self.world_size,
            "window_contexts": self.window_contexts,
            "skip_documents": self.dataset.skip_documents,
        }

    def state_dict(self) -> dict:
        return {**self._identity(), **self.cursor_state()}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in self._identity().items():
            if state.get(key) != mine:
                raise UsageError(f"cannot resume this live stream: its {key} was {state.get(key)!r}, now {mine!r}")
        self.load_cursor(state)
