"""One hook-point naming scheme for every supported family, and the modules behind each name.

Names are TransformerLens' (what SAELens users type): `blocks.{L}.<site>` with, in the order a block
runs them,

    hook_resid_pre        input of block L (the residual stream before it)
    ln1.hook_normalized   what attention reads: the block input after attention's norm (LORSA reads this)
    attn.hook_z           each head's output before W_O, the heads side by side (n_heads · d_head wide)
    hook_attn_out         attention output as added to the residual (after W_O and any post-attention norm)
    hook_resid_mid        resid_pre + attn_out: the residual stream between attention and MLP
    hook_mlp_in           the residual stream the MLP branch reads, before its norm (= resid_mid; with
                          parallel attention and MLP, = resid_pre, and there is no resid_mid)
    ln2.hook_normalized   what the MLP reads: mlp_in after the MLP's norm (transcoders, MOLT and CLT read this)
    hook_mlp_out          MLP output as added to the residual (after any post-MLP norm)
    hook_resid_post       output of block L

so that `resid_post = resid_pre + attn_out + mlp_out` in every family here, parallel residual included.
TransformerLens names saecli does not serve (per-head copies such as `hook_attn_in`, `hook_q`, the MLP's
hidden `mlp.hook_post`) are errors that say which name to use instead.

Each family is one `Layout` row (where the blocks live, the attention/MLP attribute names, the norms), so
supporting a new family is one line, not another if-chain. `attached(lm, callbacks)` is the single place
that registers torch hooks; capture, truncation and splicing are all built on it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from saecli.errors import UsageError

if TYPE_CHECKING:
    from saecli.lm.loading import LanguageModel

# Sites in forward order; a hook name is `blocks.{L}.{site}`.
SITES: tuple[str, ...] = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_in",
    "ln2.hook_normalized",
    "hook_mlp_out",
    "hook_resid_post",
)
# what each site holds, in a few words (`saecli hooks`, docs)
SITE_HELP: dict[str, str] = {
    "hook_resid_pre": "block input (the residual stream)",
    "ln1.hook_normalized": "what attention reads (after its norm)",
    "attn.hook_z": "the heads' outputs before W_O, side by side",
    "hook_attn_out": "attention output, as added to the residual",
    "hook_resid_mid": "resid_pre + attn_out",
    "hook_mlp_in": "residual the MLP reads, before its norm",
    "ln2.hook_normalized": "what the MLP reads (after its norm)",
    "hook_mlp_out": "MLP output, as added to the residual",
    "hook_resid_post": "block output",
}
# read as a module's input (forward pre-hook) rather than its output
INPUT_SITES = frozenset(
    {"hook_resid_pre", "ln1.hook_normalized", "attn.hook_z", "hook_resid_mid", "hook_mlp_in", "ln2.hook_normalized"}
)
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.([a-z0-9_.]+)$")
_FORMS = "\n".join(f"  blocks.{{L}}.{s}" for s in SITES)
# TransformerLens names saecli does not serve → what to use instead ({L} is the layer)
_NOT_SERVED = {
    "hook_attn_in": "TransformerLens' hook_attn_in is the block input copied once per head, before the norm; use "
    "blocks.{L}.hook_resid_pre (the same values, once) or blocks.{L}.ln1.hook_normalized (after the "
    "norm: what attention reads, and what saecli called hook_attn_in before)",
    "hook_q_input": "per-head inputs are not served; use blocks.{L}.ln1.hook_normalized",
    "hook_k_input": "per-head inputs are not served; use blocks.{L}.ln1.hook_normalized",
    "hook_v_input": "per-head inputs are not served; use blocks.{L}.ln1.hook_normalized",
    "attn.hook_q": "per-head queries are not served; use blocks.{L}.attn.hook_z (each head's output) or "
    "blocks.{L}.ln1.hook_normalized (what attention reads)",
    "attn.hook_k": "per-head keys are not served; use blocks.{L}.attn.hook_z or blocks.{L}.ln1.hook_normalized",
    "attn.hook_v": "per-head values are not served; use blocks.{L}.attn.hook_z or blocks.{L}.ln1.hook_normalized",
    "attn.hook_pattern": "attention patterns are not served; use blocks.{L}.attn.hook_z",
    "attn.hook_attn_scores": "attention scores are not served; use blocks.{L}.attn.hook_z",
    "attn.hook_result": "per-head results are not served; use blocks.{L}.attn.hook_z (before W_O) or "
    "blocks.{L}.hook_attn_out (summed after W_O)",
    "mlp.hook_pre": "the MLP's hidden layer (d_mlp wide) is not served; use blocks.{L}.ln2.hook_normalized (its "
    "input) or blocks.{L}.hook_mlp_out (its output)",
    "mlp.hook_post": "the MLP's hidden layer (d_mlp wide) is not served; use blocks.{L}.ln2.hook_normalized (its "
    "input) or blocks.{L}.hook_mlp_out (its output)",
    "ln1.hook_scale": "norm scales are not served; use blocks.{L}.ln1.hook_normalized",
    "ln2.hook_scale": "norm scales are not served; use blocks.{L}.ln2.hook_normalized",
}


# Saved with caches and dictionaries: their hook names mean what they mean in TransformerLens.
HOOK_NAMES = "transformerlens"


def check_saved_hook_names(hooks: list[str], marker: str | None, where: str) -> None:
    """Refuse a file saved before hook names meant TransformerLens' (no `hook_names` marker) that names
    `hook_mlp_in`: it held the MLP input AFTER its norm, which is `ln2.hook_normalized` now, so reading it
    under the new meaning would silently use other activations."""
    old = [h for h in hooks if h.endswith(".hook_mlp_in")]
    if marker != HOOK_NAMES and old:
        new = old[0][: -len("hook_mlp_in")] + "ln2.hook_normalized"
        raise UsageError(
            f"{where} was saved when saecli's `hook_mlp_in` meant the MLP input after its norm, "
            f"which TransformerLens (and saecli now) call `ln2.hook_normalized`: regenerate it, or "
            f"rename {old[0]} to {new} in it (and in the run's config.toml) and add "
            f'"hook_names": "{HOOK_NAMES}"'
        )


@dataclass(frozen=True)
class HookPoint:
    """A parsed hook name; sorts in the order the forward pass reaches the hooks."""

    layer: int
    site: str  # one of SITES, e.g. "hook_resid_post" or "ln2.hook_normalized"

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.site}"

    @property
    def order(self) -> tuple[int, int]:
        return (self.layer, SITES.index(self.site))

    @property
    def is_input(self) -> bool:
        """True when the activation is a module's input (read by a forward pre-hook)."""
        return self.site in INPUT_SITES

    def __lt__(self, other: HookPoint) -> bool:
        return self.order < other.order

    def __str__(self) -> str:
        return self.name


def parse_hook(name: str) -> HookPoint:
    """`"blocks.6.hook_resid_post"` → HookPoint(6, "hook_resid_post"); UsageError saying what to use instead."""
    m = _HOOK_RE.match(name.strip()) if isinstance(name, str) else None
    if m is not None and m.group(2) in _NOT_SERVED:
        raise UsageError(
            f"`{name}` is not served by saecli: " + _NOT_SERVED[m.group(2)].replace("{L}", m.group(1)) + "."
        )
    if m is None or m.group(2) not in SITES:
        hint = ""
        if m is not None:
            close = difflib.get_close_matches(m.group(2), SITES, n=1)
            if close:
                hint = f" Did you mean `blocks.{m.group(1)}.{close[0]}`?"
        raise UsageError(
            f"`{name}` is not a hook point name.{hint} Valid forms (TransformerLens names, L = layer index):\n{_FORMS}"
        )
    return HookPoint(int(m.group(1)), m.group(2))


# ----------------------------------------------------------------------------------------------------------
# Families


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its pieces. Paths are dotted attribute paths; block attributes are relative to a block.

    `attn_out` / `mlp_out`, when set, name the post-norm whose output is what gets added to the residual
    (gemma2/3, olmo2); otherwise the attention / MLP module's own output is. `parallel` is True, False, or the
    name of a config flag (gpt_neox, stablelm) saying whether attention and MLP both read the block input.
    """

    layers: str
    attn: str
    mlp: str
    ln1: str | None
    ln2: str | None
    final_norm: str
    attn_out: str | None = None
    mlp_out: str | None = None
    parallel: bool | str = False
    verified: bool = True  # False for a layout guessed from module names (unknown family)
    o_proj: str = (
        "o_proj"  # attention's output projection (W_O), relative to the attention module: attn.hook_z is its input
    )


_LLAMA = Layout("model.layers", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "model.norm")
_GEMMA2 = Layout(
    "model.layers",
    "self_attn",
    "mlp",
    "input_layernorm",
    "pre_feedforward_layernorm",
    "model.norm",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
)

LAYOUTS: dict[str, Layout] = {
    **{f: _LLAMA for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "phi3", "smollm3")},
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "olmo2": Layout(
        "model.layers",
        "self_attn",
        "mlp",
        None,
        None,
        "model.norm",
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
    ),
    "gpt2": Layout("transformer.h", "attn", "mlp", "ln_1", "ln_2", "transformer.ln_f", o_proj="c_proj"),
    "gpt_neox": Layout(
        "gpt_neox.layers",
        "attention",
        "mlp",
        "input_layernorm",
        "post_attention_layernorm",
        "gpt_neox.final_layer_norm",
        parallel="use_parallel_residual",
        o_proj="dense",
    ),
    "gptj": Layout("transformer.h", "attn", "mlp", "ln_1", None, "transformer.ln_f", parallel=True, o_proj="out_proj"),
    "phi": Layout(
        "model.layers",
        "self_attn",
        "mlp",
        "input_layernorm",
        None,
        "model.final_layernorm",
        parallel=True,
        o_proj="dense",
    ),
    "cohere": Layout("model.layers", "self_attn", "mlp", "input_layernorm", None, "model.norm", parallel=True),
    "stablelm": Layout(
        "model.layers",
        "self_attn",
        "mlp",
        "input_layernorm",
        "post_attention_layernorm",
        "model.norm",
        parallel="use_parallel_residual",
    ),
}


# Families whose blocks do not add the attention/MLP module outputs to the residual as they are: a guessed
# layout would give attn_out/mlp_out that do not sum to resid_post, so refuse them instead.
_UNSUPPORTED = {
    "granite": "it scales each branch by residual_multiplier before adding it to the residual",
    "granitemoe": "it scales each branch by residual_multiplier before adding it to the residual",
}


def module_at(root: nn.Module, path: str) -> Any:
    """The submodule at a dotted attribute path ("model.layers")."""
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has(root: nn.Module, path: str) -> bool:
    try:
        module_at(root, path)
        return True
    except AttributeError:
        return False


def detect_layout(model: nn.Module) -> Layout:
    """The layout of `model`: the table row for its `config.model_type`, else a guess from module names."""
    family = getattr(model.config, "model_type", "")
    if family in LAYOUTS:
        return LAYOUTS[family]
    if family in _UNSUPPORTED:
        raise UsageError(
            f"`{family}` models are not supported: {_UNSUPPORTED[family]}, so its hook points would "
            f"not add up. Supported families: {', '.join(sorted(LAYOUTS))}."
        )
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    layers = next((n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers), None)
    if layers is not None:
        block = module_at(model, layers)[0]
        parent = layers.rsplit(".", 1)[0] if "." in layers else ""
        pick = lambda root, names: next((n for n in names if _has(root, n)), None)  # noqa: E731
        attn = pick(block, ("self_attn", "attn", "attention", "self_attention"))
        mlp = pick(block, ("mlp", "feed_forward", "ffn"))
        post = ("post_feedforward_layernorm", "post_mlp_layernorm")
        norm_names = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")
        final = pick(module_at(model, parent) if parent else model, norm_names)
        o_proj = pick(module_at(block, attn), ("o_proj", "out_proj", "c_proj", "dense")) if attn else None
        if attn and mlp and final and pick(block, post) is None:
            return Layout(
                layers,
                attn,
                mlp,
                None,
                None,
                f"{parent}.{final}" if parent else final,
                verified=False,
                o_proj=o_proj or "o_proj",
            )
    raise UsageError(
        f"saecli does not know where the blocks, attention and MLP live in a `{family}` model. "
        f"Supported families: {', '.join(sorted(LAYOUTS))}. Adding one is a line in saecli/lm/hooks.py (LAYOUTS)."
    )


def layout_of(lm: LanguageModel) -> Layout:
    return lm.layout if lm.layout is not None else detect_layout(lm.model)


def is_parallel(lm: LanguageModel) -> bool:
    """Whether attention and MLP both read the block input (gpt-j, phi, pythia...)."""
    p = layout_of(lm).parallel
    return bool(getattr(lm.model.config, p, False)) if isinstance(p, str) else p


# ----------------------------------------------------------------------------------------------------------
# Modules


def _check_layer(lm: LanguageModel, layer: int) -> None:
    if not 0 <= layer < lm.n_layers:
        raise UsageError(f"layer {layer} is out of range: {lm.name} has {lm.n_layers} layers (0–{lm.n_layers - 1})")


def get_blocks(lm: LanguageModel) -> nn.ModuleList:
    return module_at(lm.model, layout_of(lm).layers)


def get_block(lm: LanguageModel, layer: int) -> nn.Module:
    _check_layer(lm, layer)
    return get_blocks(lm)[layer]


def get_attention(lm: LanguageModel, layer: int) -> nn.Module:
    return module_at(get_block(lm, layer), layout_of(lm).attn)


def get_mlp(lm: LanguageModel, layer: int) -> nn.Module:
    return module_at(get_block(lm, layer), layout_of(lm).mlp)


def get_norms(lm: LanguageModel, layer: int) -> tuple[nn.Module | None, nn.Module | None]:
    """(norm before attention, norm before the MLP); None where the family has none (olmo2) or shares ln1."""
    layout, block = layout_of(lm), get_block(lm, layer)
    return tuple(module_at(block, path) if path else None for path in (layout.ln1, layout.ln2))  # type: ignore[return-value]


def final_norm_and_unembed(lm: LanguageModel) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """(final norm as the model applies it, W_U [d_model, vocab]) so that logits = norm(resid) @ W_U.

    The norm is the model's own module (RMSNorm, LayerNorm, gemma's (1 + w) RMSNorm). W_U is read from
    the output embeddings, so tied and untied embeddings are both right. Not included: an unembedding bias
    (`unembed_bias`), and non-linear logit post-processing (gemma2's soft-capping, cohere's logit scale).
    """
    norm = module_at(lm.model, layout_of(lm).final_norm)
    return norm, lm.model.get_output_embeddings().weight.detach().T


def unembed_bias(lm: LanguageModel) -> torch.Tensor | None:
    """The unembedding bias [vocab] (phi has one), or None."""
    bias = getattr(lm.model.get_output_embeddings(), "bias", None)
    return None if bias is None else bias.detach()


# ----------------------------------------------------------------------------------------------------------
# Names


def unserved_reason(lm: LanguageModel, site: str) -> str | None:
    """Why `site` has no meaning in `lm` (None when it does): resid_mid with parallel attention and MLP,
    and the pre-norm MLP input of a layout guessed from module names."""
    if site == "hook_resid_mid" and is_parallel(lm):
        return (
            f"{lm.name} runs attention and MLP in parallel (both read the block input), so it has no "
            "resid_mid; use blocks.{L}.hook_mlp_in (here the block input) or blocks.{L}.hook_resid_pre"
        )
    if site in ("hook_resid_mid", "hook_mlp_in") and not layout_of(lm).verified and not is_parallel(lm):
        return (
            f"saecli guessed the layout of {lm.name} from its module names and cannot tell where its MLP's "
            "norm is; use blocks.{L}.ln2.hook_normalized (what the MLP reads) or blocks.{L}.hook_resid_pre"
        )
    return None


def hook_names(lm: LanguageModel) -> list[str]:
    """Every valid hook name for `lm`, in forward order."""
    sites = [s for s in SITES if unserved_reason(lm, s) is None]
    return [HookPoint(layer, site).name for layer in range(lm.n_layers) for site in sites]


def validate_hooks(lm: LanguageModel, names: list[str]) -> list[HookPoint]:
    """Parse and range-check `names`; UsageError naming the bad one and the closest valid names."""
    points = []
    for name in names:
        point = parse_hook(name)
        if point.layer >= lm.n_layers:
            close = difflib.get_close_matches(name, hook_names(lm), n=3)
            raise UsageError(
                f"hook point `{name}` does not exist: {lm.name} has {lm.n_layers} layers (0–{lm.n_layers - 1})."
                + (f" Close matches: {', '.join(close)}." if close else "")
            )
        reason = unserved_reason(lm, point.site)
        if reason is not None:
            raise UsageError(f"hook point `{name}` does not exist: " + reason.replace("{L}", str(point.layer)) + ".")
        points.append(point)
    return points


def residual_directions(lm: LanguageModel, out_hooks: list[str], directions: torch.Tensor) -> torch.Tensor:
    """[n, d_model]: directions written at `out_hooks` as residual-stream directions. Those at
    attn.hook_z ([n, n_heads · d_head], W_O's input) go through W_O without its bias; the rest are already
    residual directions."""
    z = [h for h in out_hooks if h.endswith(".attn.hook_z")]
    if not z:
        return directions
    if len(out_hooks) != 1:
        raise UsageError(
            f"directions written at {', '.join(out_hooks)} mix attn.hook_z with other hooks: they "
            "have no single residual-stream direction"
        )
    o = module_at(get_attention(lm, parse_hook(z[0]).layer), layout_of(lm).o_proj)
    w = o.weight.detach().to(directions.dtype)
    return directions @ (w.T if isinstance(o, nn.Linear) else w)  # Linear: [out, in]; GPT-2's Conv1D: [in, out]


def hook_width(lm: LanguageModel, name: str) -> int:
    """Width of the activation at `name`: d_model, except attn.hook_z (n_heads · d_head, W_O's input)."""
    point = parse_hook(name)
    if point.site != "attn.hook_z":
        return int(lm.d_model)
    o = module_at(get_attention(lm, point.layer), layout_of(lm).o_proj)
    return int(getattr(o, "in_features", None) or getattr(o, "nx", None) or o.weight.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Torch hooks


def site_module(lm: LanguageModel, point: HookPoint) -> tuple[nn.Module, bool]:
    """(module, is_input): the activation is that module's first input (pre-hook) or its output.

    resid_mid and mlp_in are the input of the MLP's norm (or of the MLP in a family without one, olmo2);
    in a parallel block whose MLP shares attention's norm (gpt-j, phi) mlp_in is the block input.
    """
    layout, block = layout_of(lm), get_block(lm, point.layer)
    site = point.site
    if site in ("hook_resid_mid", "hook_mlp_in"):
        reason = unserved_reason(lm, site)
        if reason is not None:
            raise UsageError(f"hook point `{point.name}` does not exist: " + reason.replace("{L}", str(point.layer)))
        ln2 = module_at(block, layout.ln2) if layout.ln2 is not None else None  # None in parallel stablelm
        if ln2 is not None:
            return ln2, True
        return (block if is_parallel(lm) else module_at(block, layout.mlp)), True
    path = {
        "hook_resid_pre": None,
        "hook_resid_post": None,
        "ln1.hook_normalized": layout.attn,
        "attn.hook_z": f"{layout.attn}.{layout.o_proj}",
        "hook_attn_out": layout.attn_out or layout.attn,
        "ln2.hook_normalized": layout.mlp,
        "hook_mlp_out": layout.mlp_out or layout.mlp,
    }[site]
    return (block if path is None else module_at(block, path)), point.is_input


# A callback gets the activation [B, T, d_model] and returns a tensor to use instead, or None to keep it.
Callback = Callable[[torch.Tensor], "torch.Tensor | None"]


class _Guard:
    """Set while a callback runs, so a callback may call the model's own modules (e.g. the real MLP) unhooked."""

    def __init__(self) -> None:
        self.busy = False

    def call(self, callback: Callback, x: torch.Tensor) -> torch.Tensor | None:
        if self.busy:
            return None
        self.busy = True
        try:
            return callback(x)
        finally:
            self.busy = False


def _pre_hook(callback: Callback, guard: _Guard):
    def hook(module, args, kwargs):
        if args:
            new = guard.call(callback, args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        if "hidden_states" not in kwargs:
            raise RuntimeError(f"{type(module).__name__} was called without hidden_states; cannot hook its input")
        new = guard.call(callback, kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _post_hook(callback: Callback, guard: _Guard):
    # HF modules return a tensor or a tuple whose first element is the hidden state (attention, some blocks).
    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            return guard.call(callback, output)
        new = guard.call(callback, output[0])
        return None if new is None else (new, *output[1:])

    return hook


def _resid_mid(callback: Callback) -> tuple[Callback, Callback]:
    """resid_mid is read where the MLP branch starts (its norm's input), but the block adds the MLP's output
    to the residual it held before: a replacement r' of r must reach both, so (r' − r) is added to the MLP's
    output too (after any replacement of hook_mlp_out), giving resid_post = r' + mlp_out as in TransformerLens."""
    delta: list[torch.Tensor] = []

    def read(x: torch.Tensor) -> torch.Tensor | None:
        new = callback(x)
        delta[:] = [] if new is None else [new - x]
        return new

    def fix(y: torch.Tensor) -> torch.Tensor | None:
        return (y + delta.pop()) if delta else None

    return read, fix


@contextmanager
def attached(lm: LanguageModel, callbacks: Mapping[str, Callback]) -> Iterator[None]:
    """Register one callback per hook name for the duration of the block; always removes them.

    A callback gets the activation and returns its replacement or None. While a callback runs the hooks
    are inert, so it may call the model's modules (get_mlp(lm, L)(x)) without recursing into itself.
    """
    points = validate_hooks(lm, list(callbacks))
    guard, handles = _Guard(), []
    last: list[tuple[nn.Module, Callback]] = []  # output hooks registered after all others (see _resid_mid)
    try:
        for point, callback in zip(points, callbacks.values()):
            module, is_input = site_module(lm, point)
            if point.site == "hook_resid_mid":
                callback, fix = _resid_mid(callback)
                last.append((site_module(lm, HookPoint(point.layer, "hook_mlp_out"))[0], fix))
            if is_input:
                handles.append(module.register_forward_pre_hook(_pre_hook(callback, guard), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_post_hook(callback, guard)))
        for module, fix in last:
            handles.append(module.register_forward_hook(_post_hook(fix, guard)))
        yield
    finally:
        for handle in handles:
            handle.remove()
