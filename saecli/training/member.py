"""`Member`: one dictionary being trained, with everything that is its own.

Its Adam, lr scheduler (torch's LambdaLR over `schedules.lr_factor`), the k and sparsity-coefficient
schedules, dead-latent statistics, step/token counters, metric sums, and its run folder
(checkpoints, metrics.jsonl, optional wandb run). The loop in `trainer.fit` feeds each batch to every
member, so a sweep trains many members on one stream; a single `train` is a loop with one member.

Nothing here syncs the device in the hot path: losses, statistics and the NaN flag stay on the device
and are read when metrics are logged or a checkpoint is written.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saecli.config.defaults import resolve_trainer
from saecli.data.batch import Batch
from saecli.dictionaries.base import Dictionary, StepContext
from saecli.dtypes import DTYPES
from saecli.training.checkpoint import (
    checkpoint_steps,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from saecli.training.distributed import LocalSync, Sync
from saecli.training.logger import METRICS_FILE, MetricsLog
from saecli.training.schedules import Schedule
from saecli.training.stats import FeatureStats, MetricWindow, firing_counts, flat_rows

DIVERGED_FILE = "diverged.json"
# parameter groups left out of gradient clipping (JumpReLU thresholds have their own scale)
_NO_CLIP_GROUPS = ("jumprelu", "threshold")


def make_optimizer(dictionary: Dictionary, cfg: Any) -> torch.optim.Adam:
    """Adam over the dictionary's parameter groups: fused where torch has it, else foreach."""
    lr = float(cfg.lr)
    groups = dictionary.param_groups(lr, cfg.jumprelu_lr_factor)
    kwargs = dict(lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.optimizer_foreach:
        device = groups[0]["params"][0].device
        if device.type in ("cuda", "cpu"):
            with contextlib.suppress(RuntimeError, ValueError, TypeError):
                return torch.optim.Adam(groups, fused=True, **kwargs)
        return torch.optim.Adam(groups, foreach=True, **kwargs)
    return torch.optim.Adam(groups, foreach=False, **kwargs)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tokens_per_second(tokens: int, seconds: float) -> float:
    """The one throughput figure saecli reports (progress bar, metrics.jsonl, summary.json, wandb):
    tokens trained ÷ wall time spent training, both over the whole run (resumed sessions included), so
    `tokens / elapsed_s` of any record gives it back."""
    return tokens / seconds if seconds > 0 else 0.0


class Member:
    """One dictionary + its optimisation state. `feed(batch)` per batch; the loop does the rest."""

    def __init__(
        self,
        dictionary: Dictionary,
        cfg: Any,
        *,
        total_steps: int,
        batch_tokens: int,
        folder: str | Path | None = None,
        name: str = "run",
        sync: Sync | None = None,
        wandb: Any = None,
    ):
        if total_steps < 1:
            raise ValueError(f"a run needs at least one step, got total_steps={total_steps}")
        self.dictionary = dictionary
        self.cfg = cfg
        self.name = name
        self.folder = Path(folder) if folder is not None else None
        self.sync = sync or LocalSync()
        self.wandb = wandb
        self.total_steps = int(total_steps)
        self.batch_tokens = int(batch_tokens)  # tokens of one batch on one rank
        self.accumulation = int(cfg.gradient_accumulation_steps)
        tokens_per_step = self.batch_tokens * self.accumulation * self.sync.world_size
        dcfg = dictionary.cfg
        # The driver's config is resolved already (config.toml records it); a bare TrainerConfig (tests,
        # benchmarks) gets the same defaults here: `cfg` is what this member trains with, every key set.
        cfg = self.cfg = resolve_trainer(
            cfg,
            activation=dcfg.activation,
            d_sae=dictionary.d_sae,
            d_model=dictionary.d_model,
            run_tokens=self.total_steps * tokens_per_step,
        )
        self.sparsity_loss_type = cfg.sparsity_loss_type
        self.schedule = Schedule.from_config(cfg, total_steps=self.total_steps, k=int(dcfg.k or 0))
        first = next(dictionary.parameters())
        self.device, self.param_dtype = first.device, first.dtype
        self.hooks = list(dict.fromkeys(dictionary.in_hooks + dictionary.out_hooks))
        self.optimizer = make_optimizer(dictionary, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule.lr_lambda())
        self._clip_params = [
            p
            for g in self.optimizer.param_groups
            if g.get("clip", True) and not any(s in str(g.get("name", "")) for s in _NO_CLIP_GROUPS)
            for p in g["params"]
        ]
        self._all_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.amp_dtype = DTYPES[cfg.amp_dtype] if cfg.amp_dtype else None
        use_scaler = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.stats = FeatureStats(
            dictionary.d_sae,
            window=self.schedule.sampling_window,
            dead_threshold_tokens=self.schedule.dead_threshold_tokens,
            device=self.device,
        )
        self.window = MetricWindow(self.device)
        self.k_aux = int(cfg.k_aux)
        self.checkpoint_at = set(checkpoint_steps(self.total_steps, cfg.n_checkpoints, cfg.check_point_save_mode))
        self.step = 0  # completed optimizer steps
        self.micro = 0  # batches fed since the last optimizer step
        self.tokens = 0  # tokens trained on (all ranks)
        self.status = "running"  # running | finished | diverged | stopped
        self.message = ""
        self.last_record: dict[str, Any] = {}
        self._bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)  # first non-finite loss
        self._grad_norm: torch.Tensor | None = None
        self._lr_used = 0.0
        self._last_extra: dict[str, Any] = {}
        self._scratch_buf: torch.Tensor | None = None
        self._log_clock = time.perf_counter()
        self._log_tokens = 0
        self._elapsed_before = 0.0  # wall time of earlier sessions (resume)
        self._start = time.perf_counter()
        self.log = MetricsLog(self.folder / METRICS_FILE) if (self.folder and self.sync.is_main) else None

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def at_boundary(self) -> bool:
        """True between optimizer steps (no half-accumulated gradient): a checkpoint can be taken."""
        return self.micro == 0

    @property
    def input_dtype(self) -> torch.dtype:
        return self.param_dtype

    def context(self) -> StepContext:
        """The step's hyper-parameters after schedules, handed to the dictionary's loss."""
        cfg = self.cfg
        return StepContext(
            k=self.schedule.k_at(self.step),
            l1_coefficient=self.schedule.l1_at(self.step),
            lp_coefficient=cfg.lp_coefficient,
            auxk_coefficient=cfg.auxk_coefficient,
            k_aux=self.k_aux,
            multi_topk_coefficient=cfg.multi_topk_coefficient,
            dead_mask=self.stats.dead_mask(),
            sparsity_loss_type=self.sparsity_loss_type,
            p=cfg.p,
            tanh_stretch_coefficient=cfg.tanh_stretch_coefficient,
            frequency_scale=cfg.frequency_scale,
            training=True,
        )

    # ------------------------------------------------------------------ the step
    def feed(self, batch: Batch) -> bool:
        """Forward + backward on one batch; an optimizer step every `accumulation` batches. True if it stepped."""
        mask = batch.mask if batch.is_context else None
        raw = {h: batch.acts[h] for h in self.hooks}
        ctx = self.context()
        self.dictionary.train()
        amp = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with amp:
            out = self.dictionary(raw, ctx, mask=mask)
        loss = out.loss
        bad = ~torch.isfinite(loss.detach())
        self._bad_step = torch.where(bad & (self._bad_step < 0), self.step, self._bad_step)
        # statistics first: a kind may hand back a work buffer as feature_acts that backward reuses
        self._record(out, mask, batch.n_tokens)
        scaled = loss / self.accumulation
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        self.micro += 1
        if self.micro < self.accumulation:
            return False
        self.micro = 0
        self._optimizer_step()
        return True

    @torch.no_grad()
    def _record(self, out, mask: torch.Tensor | None, n_tokens: int) -> None:
        counts = self.latent_counts(out.feature_acts, mask)
        if self.sync.world_size > 1:  # every rank keeps the same statistics (same AuxK mask)
            both = self.sync.all_reduce_sum_(torch.cat([counts.to(torch.int64), counts.new_tensor([n_tokens])]))
            counts, n_tokens = both[:-1], int(both[-1])
        self.stats.update(counts, n_tokens)
        w = self.window
        w.add("loss", out.loss)
        for key, value in out.terms.items():
            w.add(f"loss/{key}", value)
        w.add("fires", counts.sum())
        w.add("tokens", float(n_tokens))
        if self._samples_reconstruction():
            for hook, target in out.target.items():
                x = flat_rows(target.detach(), mask)
                x_hat = flat_rows(out.reconstruction[hook].detach(), mask)
                buf = self._scratch(x.shape, x.device)  # reused: no fresh [N, d] buffers per step
                w.add(f"sse/{hook}", torch.sub(x_hat, x, out=buf).square_().sum())
                w.add(f"sst/{hook}", torch.sub(x, x.float().mean(0), out=buf).square_().sum())
                w.add(f"elements/{hook}", float(x.numel()))
        self._last_extra = out.extra
        self.tokens += n_tokens

    def latent_counts(self, feature_acts: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[d_sae] firing counts of one batch on this rank (a tensor-parallel member gathers its shards)."""
        return firing_counts(feature_acts, mask)

    def _samples_reconstruction(self) -> bool:
        """Reconstruction error is summed on every `stride`-th step (≈ 8 per logging window) and on the
        step before each log: a sample that costs little next to the dictionary's own step."""
        stride = max(1, self.cfg.log_frequency // 8)
        return self.step % stride == 0 or self._logs_at(self.step + 1)

    def _scratch(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        buf = self._scratch_buf
        if buf is None or buf.shape != shape or buf.device != device:
            buf = self._scratch_buf = torch.empty(shape, dtype=torch.float32, device=device)
        return buf

    def _optimizer_step(self) -> None:
        self.sync.all_reduce_grads(self._all_params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        log_now = self._logs_at(self.step + 1)
        if self.cfg.clip_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self._clip_params, self.cfg.clip_grad_norm)
            if log_now:
                self._grad_norm = norm.detach()
        elif log_now:
            grads = [p.grad for p in self._all_params if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self._lr_used = float(self.scheduler.get_last_lr()[0])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            self.dictionary.post_step()
        self.step += 1
        self.stats.end_step()
        self.window.steps += 1

    # ------------------------------------------------------------------ metrics
    def _logs_at(self, step: int) -> bool:
        return step % self.cfg.log_frequency == 0 or step == self.total_steps

    def should_log(self) -> bool:
        return self.at_boundary and self._logs_at(self.step)

    def check_finite(self) -> bool:
        """One sync: did any loss so far turn NaN/inf? If so the member stops (status "diverged")."""
        bad = self._bad_step.clone()
        if self.sync.world_size > 1:
            flag = self.sync.all_reduce_sum_((bad >= 0).to(torch.int64).reshape(1))
            if int(flag) > 0 and int(bad) < 0:
                bad = torch.tensor(self.step)
        bad_step = int(bad)
        if bad_step < 0:
            return True
        self._diverge(bad_step)
        return False

    def _diverge(self, bad_step: int) -> None:
        self.status = "diverged"
        found = latest_checkpoint(self.folder) if self.folder else None
        kept = (
            f"the last good checkpoint (step {found[0]}) is kept in {found[1]}"
            if found
            else "no checkpoint had been written yet"
        )
        self.message = (
            f"{self.name}: the loss became NaN/inf at step {bad_step + 1}; training of this dictionary "
            f"stopped and {kept}. Lower trainer.lr, enable trainer.clip_grad_norm, or check the "
            "activations for NaN/inf."
        )
        if self.folder and self.sync.is_main:
            from saecli.fsio import write_json

            write_json(
                self.folder / DIVERGED_FILE,
                {"step": bad_step + 1, "message": self.message, "last_checkpoint": found[0] if found else None},
            )

    def metrics(self) -> dict[str, Any]:
        """Means over the steps since the last log (one sync), then reset the window."""
        now = time.perf_counter()
        grad_norm = self._grad_norm

        def make(sums: dict[str, float], counts: dict[str, int]) -> dict[str, Any]:
            rec: dict[str, Any] = {"step": self.step, "tokens": self.tokens}
            if "loss" in sums:
                rec["loss"] = sums["loss"] / counts["loss"]
            for key in sums:
                if key.startswith("loss/"):
                    rec[key] = sums[key] / counts[key]
            tokens = max(sums.get("tokens", 0.0), 1.0)
            rec["l0"] = sums.get("fires", 0.0) / tokens
            hooks = [k[4:] for k in sums if k.startswith("sse/")]
            sse = sum(sums[f"sse/{h}"] for h in hooks)
            sst = sum(sums[f"sst/{h}"] for h in hooks)
            elements = sum(sums[f"elements/{h}"] for h in hooks)
            rec["explained_variance"] = 1.0 - sse / sst if sst > 0 else float("nan")
            rec["mse"] = sse / max(elements, 1.0)
            if len(hooks) > 1:
                for h in hooks:
                    rec[f"explained_variance/{h}"] = (
                        1.0 - sums[f"sse/{h}"] / sums[f"sst/{h}"] if sums[f"sst/{h}"] > 0 else float("nan")
                    )
            return rec

        rec = self.window.read(make)
        rec.update(self.stats.summary(self.cfg.dead_feature_threshold, self.cfg.dense_feature_threshold))
        rec["lr"] = self._lr_used
        rec["k"] = self.schedule.k_at(max(self.step - 1, 0))
        rec["l1_coefficient"] = self.schedule.l1_at(max(self.step - 1, 0))
        if grad_norm is not None:
            rec["grad_norm"] = float(grad_norm)
        rec["elapsed_s"] = self._elapsed_before + (now - self._start)
        rec["tokens_per_s"] = tokens_per_second(self.tokens, rec["elapsed_s"])
        for key, value in (self._last_extra or {}).items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = float(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rec.setdefault(key, value)
        self.window.reset()
        self._log_clock, self._log_tokens = now, self.tokens
        self._grad_norm = None
        return rec

    def write_metrics(self, rec: dict[str, Any]) -> None:
        self.last_record = rec
        if self.log is not None:
            self.log.write(rec)
        if self.wandb is not None:
            self.wandb.log(rec)

    # ------------------------------------------------------------------ checkpoints
    def wants_checkpoint(self) -> bool:
        return self.step in self.checkpoint_at

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights: what a resumed member needs to continue bit for bit."""
        return {
            "name": self.name,
            "step": self.step,
            "micro": self.micro,
            "tokens": self.tokens,
            "total_steps": self.total_steps,
            "batch_tokens": self.batch_tokens,
            "status": self.status,
            "world_size": self.sync.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "stats": self.stats.state_dict(),
            "window": self.window.state_dict(),
            "log_tokens": self._log_tokens,
            "grad_norm": None if self._grad_norm is None else float(self._grad_norm),
            "lr_used": self._lr_used,
            "last_record": self.last_record,
            "elapsed_s": self._elapsed_before + (time.perf_counter() - self._start),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["total_steps"] != self.total_steps:
            raise ValueError(f"checkpoint is for a run of {state['total_steps']} steps, not {self.total_steps}")
        self.step, self.micro, self.tokens = state["step"], state["micro"], state["tokens"]
        if "optimizer" in state:  # else in the checkpoint's DCP folder (tensor parallel)
            self.load_optimizer(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.stats.load_state_dict(state["stats"])
        self.window.load_state_dict(state["window"])
        self._log_tokens = state["log_tokens"]
        self._grad_norm = None if state["grad_norm"] is None else torch.tensor(state["grad_norm"])
        self._lr_used = state["lr_used"]
        self.last_record = dict(state.get("last_record") or {})
        self._elapsed_before = state.get("elapsed_s", 0.0)
        self._start = time.perf_counter()
        self._log_clock = time.perf_counter()
        self.status = "finished" if self.step >= self.total_steps else "running"

    def load_optimizer(self, saved: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(saved)

    @staticmethod
    def load_weights(dictionary: Dictionary, weights: dict[str, torch.Tensor]) -> None:
        dictionary.load_state_dict(weights)

    def save_checkpoint(self, shared: dict[str, Any]) -> Path | None:
        """Write this member's checkpoint (weights + state + the loop's `shared` state). Rank 0 only."""
        if self.folder is None or not self.sync.is_main:
            return None
        state = {"member": self.state_dict(), **shared}
        return save_checkpoint(self.folder, self.step, self.dictionary.state_dict(), state)

    @classmethod
    def from_checkpoint(cls, dictionary: Dictionary, cfg: Any, path: str | Path, **kwargs) -> tuple[Member, dict]:
        """A member restored from a checkpoint folder, and the checkpoint's shared state (stream, RNG)."""
        device = next(dictionary.parameters()).device
        weights, state = load_checkpoint(path, device=device)
        if weights:  # else a sharded checkpoint: read below, resharded to this member's layout
            cls.load_weights(dictionary, weights)
        ms = state["member"]
        member = cls(
            dictionary,
            cfg,
            total_steps=ms["total_steps"],
            batch_tokens=ms["batch_tokens"],
            name=kwargs.pop("name", ms["name"]),
            **kwargs,
        )
        if ms.get("world_size", 1) != member.sync.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {ms.get('world_size', 1)} processes; "
                f"resume it with the same number (now {member.sync.world_size})"
            )
        member.load_state_dict(ms)
        if not weights:
            from saecli.training.dcp import load_sharded

            load_sharded(member.dictionary, member.optimizer, path)
        if member.log is not None:
            member.log.truncate(member.step)
        shared = {k: v for k, v in state.items() if k != "member"}
        return member, shared

    # ------------------------------------------------------------------ end
    def summary(self) -> dict[str, Any]:
        """The final metrics: the last logged record plus counters."""
        out: dict[str, Any] = {k: v for k, v in self.last_record.items() if isinstance(v, (int, float))}
        if self.last_record.get("tokens") != self.tokens:  # steps after the last log: time them too
            elapsed = self._elapsed_before + (time.perf_counter() - self._start)
            out.update({"elapsed_s": elapsed, "tokens_per_s": tokens_per_second(self.tokens, elapsed)})
        out.update({"step": self.step, "tokens": self.tokens, "status": self.status})
        if self.message:
            out["message"] = self.message
        return out

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.wandb is not None:
            with contextlib.suppress(Exception):
                self.wandb.summary(self.summary())
            with contextlib.suppress(Exception):
                self.wandb.finish()
            self.wandb = None


def read_diverged(folder: str | Path) -> dict | None:
    """The divergence record a member left in its folder, if any."""
    path = Path(folder) / DIVERGED_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
