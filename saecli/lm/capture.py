"""Truncated forward: run the LM only as far as the deepest requested hook and return the activations.

The hook that completes the set raises a private exception, so no later layer, final norm or unembedding
runs; to `generate` at layer 6 of a 30-layer model this is the difference between 7 and 30 layers.
"""

from __future__ import annotations

import torch

from saecli.lm.hooks import attached
from saecli.lm.loading import LanguageModel


class _Captured(Exception):
    """Raised inside the forward once every requested activation is in hand."""


def _inputs(lm: LanguageModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
    kwargs = {"input_ids": input_ids.to(lm.device), "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(lm.device)
    return kwargs


@torch.no_grad()
def run_to_hooks(
    lm: LanguageModel, input_ids: torch.Tensor, hook_points: list[str], attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """{hook: activation [B, T, d_model]} (model dtype and device, detached, contiguous, owned copies).

    No autograd graph is built (plain no_grad, not inference_mode, so a trainer may use the tensors as
    inputs to its own differentiable ops).
    """
    wanted = list(dict.fromkeys(hook_points))
    if not wanted:
        return {}
    acts: dict[str, torch.Tensor] = {}

    def grab(name: str):
        def callback(x: torch.Tensor) -> None:
            acts[name] = x.detach().clone(memory_format=torch.contiguous_format)
            if len(acts) == len(wanted):
                raise _Captured

        return callback

    try:
        with attached(lm, {name: grab(name) for name in wanted}):
            lm.model(**_inputs(lm, input_ids, attention_mask))
    except _Captured:
        pass
    missing = [name for name in wanted if name not in acts]
    if missing:  # a hook whose module the forward never called: a layout bug, not a user error
        raise RuntimeError(f"the forward pass of {lm.name} never reached {', '.join(missing)}")
    return {name: acts[name] for name in wanted}
