"""Causal LMs for saecli: loading (hub, local folder, GGUF), one hook-point naming scheme for every
family, a truncated forward that stops after the deepest hook, and splicing for CE/KL evaluation.

    lm = load_model(exp.model)
    acts = run_to_hooks(lm, tokens, ["blocks.6.hook_resid_post"])          # runs 7 of the layers
    logits = forward_with_replacements(lm, tokens, {"blocks.6.hook_resid_post": sae_reconstruct})
"""

from saecli.lm.capture import run_to_hooks
from saecli.lm.hooks import (
    SITES,
    HookPoint,
    Layout,
    attached,
    final_norm_and_unembed,
    get_attention,
    get_block,
    get_blocks,
    get_mlp,
    get_norms,
    hook_names,
    is_parallel,
    parse_hook,
    unembed_bias,
    validate_hooks,
)
from saecli.lm.loading import LanguageModel, load_model, resolve_device, wrap_model
from saecli.lm.splice import forward_with_hook_fn, forward_with_replacements

__all__ = [
    "SITES",
    "HookPoint",
    "LanguageModel",
    "Layout",
    "attached",
    "final_norm_and_unembed",
    "forward_with_hook_fn",
    "forward_with_replacements",
    "get_attention",
    "get_block",
    "get_blocks",
    "get_mlp",
    "get_norms",
    "hook_names",
    "is_parallel",
    "load_model",
    "parse_hook",
    "resolve_device",
    "run_to_hooks",
    "unembed_bias",
    "validate_hooks",
    "wrap_model",
]
