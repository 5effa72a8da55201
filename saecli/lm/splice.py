"""Splicing: run the full forward with some activations replaced (SAE reconstructions, transcoder
outputs, zero-ablations) and return the logits, for CE-loss-recovered and KL evaluation.

    logits = forward_with_replacements(lm, tokens, {"blocks.6.hook_resid_post": lambda x: sae(x)})

A replacement is cast back to the activation's dtype and device, so an SAE kept in float32 can splice
into a bfloat16 model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext

import torch

from saecli.lm.capture import _inputs
from saecli.lm.hooks import Callback, attached
from saecli.lm.loading import LanguageModel


def _fit(name: str, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    if new.shape != old.shape:
        raise ValueError(f"the replacement for {name} has shape {tuple(new.shape)}; expected {tuple(old.shape)}")
    return new.to(dtype=old.dtype, device=old.device)


def _logits(lm: LanguageModel, callbacks: Mapping[str, Callback], input_ids, attention_mask, grad: bool):
    with attached(lm, callbacks), nullcontext() if grad else torch.no_grad():
        return lm.model(**_inputs(lm, input_ids, attention_mask)).logits


def forward_with_replacements(
    lm: LanguageModel,
    input_ids: torch.Tensor,
    replacements: Mapping[str, Callable[[torch.Tensor], torch.Tensor | None]],
    attention_mask: torch.Tensor | None = None,
    *,
    grad: bool = False,
) -> torch.Tensor:
    """Logits [B, T, vocab] of a full forward where each hook's activation is replaced by `fn(activation)`.

    Any number of hooks at once (a CLT replaces every layer's mlp_out). A callable may return None to keep
    the activation (e.g. to stash the MLP input for a later mlp_out callable). `grad=True` keeps autograd on.
    """

    def wrap(name: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Callback:
        def callback(x: torch.Tensor) -> torch.Tensor | None:
            new = fn(x)
            return None if new is None else _fit(name, new, x)

        return callback

    return _logits(lm, {n: wrap(n, f) for n, f in replacements.items()}, input_ids, attention_mask, grad)


def forward_with_hook_fn(
    lm: LanguageModel,
    input_ids: torch.Tensor,
    fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    reads: list[str],
    writes: list[str],
    attention_mask: torch.Tensor | None = None,
    *,
    grad: bool = False,
) -> torch.Tensor:
    """Logits of a forward where `fn` computes the `writes` from the `reads` seen so far.

    When the forward reaches a write hook W, `fn(acts)` is called with every read activation reached so
    far in this (spliced) forward, plus W's own original activation as the last entry (`acts[W]`); it
    returns a dict holding a replacement for W (other keys are ignored). A transcoder:

        fn = lambda acts: {"blocks.3.hook_mlp_out": tc(acts["blocks.3.ln2.hook_normalized"])}
        forward_with_hook_fn(lm, tokens, fn, reads=["blocks.3.ln2.hook_normalized"], writes=["blocks.3.hook_mlp_out"])

    A CLT passes every layer's ln2.hook_normalized as reads and every mlp_out as writes; its input at layer L then
    already reflects the replaced outputs of layers < L, as in the replacement model. A hook that is both
    read and written is read before it is replaced.
    """
    seen: dict[str, torch.Tensor] = {}
    read_set, write_set = set(reads), set(writes)

    def make(name: str) -> Callback:
        def callback(x: torch.Tensor) -> torch.Tensor | None:
            if name in read_set:
                seen[name] = x
            if name not in write_set:
                return None
            acts = {k: v for k, v in seen.items() if k != name}
            acts[name] = x
            out = fn(acts)
            if name not in out:
                raise KeyError(f"the hook function returned {sorted(out)} but not the replacement for {name}")
            return _fit(name, out[name], x)

        return callback

    names = list(dict.fromkeys([*reads, *writes]))
    return _logits(lm, {n: make(n) for n in names}, input_ids, attention_mask, grad)
