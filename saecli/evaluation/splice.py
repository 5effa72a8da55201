"""Does the model still work with the dictionary in it? CE loss and KL with the reconstruction spliced in.

For each batch of held-out contexts four forwards run:

1. **clean** — the model as is. Replacement functions on the dictionary's hooks record their
   activations and hand them on unchanged (this is how the inputs of a transcoder or CLT are read
   in the same forward that gives the clean logits);
2. **spliced** — every out hook's activation is replaced by `dictionary.reconstruct(clean inputs)`;
3. **zero** — every out hook's activation is replaced by zeros (the ablation baseline);
4. **mean** — every out hook's activation is replaced by its mean over the batch's counted positions
   (mean-ablation: keeps the hook's constant part, which zeros remove; the fairer baseline where a
   hook's mean is large, e.g. an MLP's or attention's output).

Metrics, averaged over counted next-token predictions:
    loss_recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean)   (1 = as good as the model,
                                                                      0 = as bad as deleting the hooks)
    loss_recovered_mean_ablation = (CE_mean − CE_spliced) / (CE_mean − CE_clean)
    kl_spliced = mean_t KL(p_clean ‖ p_spliced),  kl_score = (KL_zero − KL_spliced) / KL_zero.

A ratio whose ablation moves the loss by less than `min_gap` nats is noise over noise (values like
2.7 when splicing is slightly worse than an ablation that barely matters): it is reported as None,
with the reason under `<name>_undefined`.

Choices, and why:
- **Ignored positions** (BOS, separators, other ignored ids: `mask` False) keep their original
  activation in the spliced and zero-ablated runs. A dictionary is neither trained nor evaluated on
  them, and BOS's activation norm is often 10–100× the others': reconstructing it badly would wreck
  the CE of the whole context and measure the wrong thing.
- **Counted predictions**: the prediction made at position t (of token t+1) counts when position t
  counts and token t+1 exists (and is not padding). The prediction made at BOS is therefore left out
  (its activations are not replaced, so its logits are identical in all three runs anyway).
- **Open loop** for dictionaries with several hooks: reconstructions are computed from the *clean*
  activations of the in hooks, then all out hooks are replaced at once. For an SAE or a transcoder
  this is exactly the spliced model (nothing upstream of its inputs changes). For a crosscoder, whose
  latents read every layer, no causal splice exists; for a CLT it is the standard "each layer's output
  replaced by the CLT's reconstruction from the clean inputs", not a replacement model in which later
  layers read the already-replaced stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from saecli.dictionaries.base import Dictionary

if TYPE_CHECKING:
    from saecli.lm.loading import LanguageModel


MIN_ABLATION_GAP = 0.05  # nats: an ablation that moves the CE less than this makes a ratio meaningless


@dataclass
class SpliceSums:
    """Sums over counted predictions; `result()` turns them into means and ratios."""

    n_tokens: int = 0
    n_contexts: int = 0
    ce_clean: float = 0.0
    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    ce_mean: float = 0.0
    kl_spliced: float = 0.0
    kl_zero: float = 0.0
    kl_mean: float = 0.0

    def add(self, other: SpliceSums) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def result(self, min_gap: float = MIN_ABLATION_GAP) -> dict[str, Any]:
        n = max(self.n_tokens, 1)
        clean, spliced, zero, mean = self.ce_clean / n, self.ce_spliced / n, self.ce_zero / n, self.ce_mean / n
        kl_s, kl_z = self.kl_spliced / n, self.kl_zero / n
        out: dict[str, Any] = {
            "ce_loss_clean": clean,
            "ce_loss_spliced": spliced,
            "ce_loss_zero_ablation": zero,
            "ce_loss_mean_ablation": mean,
            "ce_loss_increase": spliced - clean,
            "kl_div_spliced": kl_s,
            "kl_div_zero_ablation": kl_z,
            "kl_div_mean_ablation": self.kl_mean / n,
            "kl_div_score": (kl_z - kl_s) / kl_z if kl_z != 0 else float("nan"),
            "ce_tokens": self.n_tokens,
            "ce_contexts": self.n_contexts,
        }
        for name, ablated, what in (("loss_recovered", zero, "zero"), ("loss_recovered_mean_ablation", mean, "mean")):
            value, reason = recovered(clean, spliced, ablated, min_gap, what)
            out[name] = value
            if reason is not None:
                out[f"{name}_undefined"] = reason
        return out


def recovered(
    clean: float, spliced: float, ablated: float, min_gap: float, what: str
) -> tuple[float | None, str | None]:
    """(CE_ablated − CE_spliced) / (CE_ablated − CE_clean), or (None, why) when the ablation barely moves the loss."""
    gap = ablated - clean
    if not (gap > 0 and gap >= min_gap):  # NaN too
        return None, (
            f"{what}-ablating the hooks moves the CE loss by {gap:+.4g} nats (< {min_gap:g}, "
            "eval.loss_recovered_min_gap): the ratio would divide noise by noise"
        )
    return (ablated - spliced) / gap, None


def _forward(
    lm: LanguageModel,
    tokens: torch.Tensor,
    replacements: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    from saecli.lm import forward_with_replacements

    return forward_with_replacements(lm, tokens, replacements, attention_mask=attention_mask)


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [B, T-1, V] in float32 (the last position predicts nothing)."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def counted_predictions(mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T-1] bool: the prediction at t counts when position t counts and token t+1 is real."""
    counted = mask[:, :-1].clone()
    if attention_mask is not None:
        counted &= attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return counted


@torch.no_grad()
def reconstruct_hooks(
    dictionary: Dictionary, acts: dict[str, torch.Tensor], mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Raw [B, T, d] activations → raw [B, T, d] reconstructions of the out hooks, for any kind.

    Token dictionaries see only the counted positions (`mask`; zeros elsewhere), so that BOS never
    enters batch statistics; context dictionaries get the whole windows, as they were trained.
    """
    param = next(dictionary.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else None
    if dictionary.needs_context:
        return dictionary.reconstruct({h: a.to(device=device, dtype=dtype) for h, a in acts.items()})
    first = next(iter(acts.values()))
    b, t = first.shape[:2]
    keep = (mask.reshape(-1) if mask is not None else torch.ones(b * t, dtype=torch.bool)).to(first.device)
    idx = keep.nonzero().squeeze(1)
    flat = {
        h: a.reshape(b * t, a.shape[-1]).index_select(0, idx).to(device=device, dtype=dtype) for h, a in acts.items()
    }
    recon = dictionary.reconstruct(flat)
    out = {}
    for h, y in recon.items():
        full = torch.zeros(b * t, y.shape[-1], dtype=y.dtype, device=y.device)
        full.index_copy_(0, idx.to(y.device), y)
        out[h] = full.reshape(b, t, y.shape[-1])
    return out


@torch.no_grad()
def splice_batch(
    lm: LanguageModel,
    dictionary: Dictionary,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> SpliceSums:
    """The three forwards on one [B, T] batch of contexts; `mask` [B, T] marks counted positions."""
    hooks = list(dict.fromkeys(dictionary.in_hooks + dictionary.out_hooks))
    captured: dict[str, torch.Tensor] = {}

    def record(hook: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(act: torch.Tensor) -> torch.Tensor:
            captured[hook] = act
            return act

        return fn

    logits = _forward(lm, tokens, {h: record(h) for h in hooks}, attention_mask)
    missing = [h for h in hooks if h not in captured]
    if missing:
        raise RuntimeError(f"the model never reached hook(s) {missing} during the clean forward")
    logp_clean = _log_probs(logits)
    del logits
    targets = tokens[:, 1:].to(logp_clean.device)
    counted = counted_predictions(mask, attention_mask).to(logp_clean.device)
    keep = mask.to(next(iter(captured.values())).device)[..., None]  # [B, T, 1]: positions to replace
    n_kept = keep.sum().clamp(min=1)
    means = {h: (captured[h].double() * keep).sum((0, 1)) / n_kept for h in dictionary.out_hooks}

    recon = reconstruct_hooks(dictionary, captured, mask)
    captured.clear()

    def replace_with(values: dict[str, torch.Tensor] | None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        def make(hook: str) -> Callable[[torch.Tensor], torch.Tensor]:
            def fn(act: torch.Tensor) -> torch.Tensor:
                new = torch.zeros_like(act) if values is None else values[hook].to(act.dtype).expand_as(act)
                return torch.where(keep, new, act)

            return fn

        return {h: make(h) for h in dictionary.out_hooks}

    sums = SpliceSums(n_tokens=int(counted.sum()), n_contexts=int(tokens.shape[0]))
    sums.ce_clean = _masked_ce(logp_clean, targets, counted)
    for name, values in (("spliced", recon), ("zero", None), ("mean", means)):
        logp = _log_probs(_forward(lm, tokens, replace_with(values), attention_mask))
        setattr(sums, f"ce_{name}", _masked_ce(logp, targets, counted))
        setattr(sums, f"kl_{name}", _masked_kl(logp_clean, logp, counted))
        del logp
    return sums


def _masked_ce(logp: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor) -> float:
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(nll[counted].sum(dtype=torch.float64))


def _masked_kl(logp_ref: torch.Tensor, logp: torch.Tensor, counted: torch.Tensor) -> float:
    """Σ over counted positions of KL(ref ‖ other) = Σ_v p_ref (log p_ref − log p_other)."""
    ref, other = logp_ref[counted], logp[counted]
    kl = (ref.exp() * (ref - other)).sum(-1)
    return float(kl.sum(dtype=torch.float64))


def splice_eval(
    lm: LanguageModel,
    dictionary: Dictionary,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    on_batch: Callable[[SpliceSums], None] | None = None,
    min_gap: float = MIN_ABLATION_GAP,
) -> dict[str, Any]:
    """Run `splice_batch` over (tokens [B, T], mask [B, T]) batches and return the averaged metrics."""
    total = SpliceSums()
    for tokens, mask in batches:
        tokens, mask = tokens.to(lm.device), mask.to(lm.device)
        part = splice_batch(lm, dictionary, tokens, mask)
        total.add(part)
        if on_batch is not None:
            on_batch(part)
    return total.result(min_gap)
