"""The Dictionary interface, checked for every kind in the registry (a new kind is tested by default).

Each registered kind is built on tiny shapes with every activation rule and must: encode/decode with
the declared hooks and shapes, give a finite loss whose gradient reaches its parameters, save and load
to the same weights and outputs, put every trainable parameter in exactly one optimizer group, map raw
activations to the same raw reconstructions after `fold_activation_scale()`, and declare its optional
capabilities (saecli/dictionaries/base.py) with the declared types.

A kind whose config needs keys beyond the shared ones (or has optional parts to switch on) adds them to
REQUIRED below; nothing else here names a kind.
"""

from __future__ import annotations

import pytest
import torch

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.dictionaries.base import Dictionary, LossOutput, StepContext
from saecli.dictionaries.registry import build_dictionary, dictionary_class, kinds, load_dictionary

D_MODEL, D_SAE, K = 8, 16, 4
B, T = 3, 5  # context kinds: B contexts of T tokens; token kinds: B·T tokens
# two layers' (input, output) pairs: single-hook kinds take the first, in→out kinds the first two,
# crosscoders all four heads, a CLT the first half as inputs and the second half as outputs
HOOKS = [
    "blocks.0.ln2.hook_normalized",
    "blocks.0.hook_mlp_out",
    "blocks.1.ln2.hook_normalized",
    "blocks.1.hook_mlp_out",
]
REQUIRED: dict[str, dict] = {  # keys a kind's config cannot do without, and switches for its optional parts
    "lorsa": {"n_qk_heads": 2},
    "molt": {"rank_counts": {"1": 8, "2": 8}, "d_sae": None},
    "transcoder": {"skip_connection": True},
}
ACTIVATIONS = ["relu", "topk", "batchtopk", "jumprelu"]


def make(kind: str, activation: str) -> Dictionary:
    table = {
        "kind": kind,
        "d_sae": D_SAE,
        "k": K,
        "activation": activation,
        "norm_activation": "dataset-wise",
        "jumprelu_threshold_init": 0.05,
        **REQUIRED.get(kind, {}),
    }
    cfg = parse(DictionaryConfig, {k: v for k, v in table.items() if v is not None}, key="sae")
    torch.manual_seed(0)
    d = build_dictionary(cfg, D_MODEL, HOOKS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for hook in dict.fromkeys(d.in_hooks + d.out_hooks):  # a scale per hook, as the trainer sets from data
            d.set_dataset_norm(hook, 0.5 + float(torch.rand((), generator=g)) * 4)
        for name, p in d.named_parameters():  # every weight away from its zero/flat start (biases, a skip)
            if name.endswith("log_threshold"):
                p.copy_(torch.full_like(p, 0.05).log() + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return d


def raw_acts(d: Dictionary, seed: int = 2) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Raw activations at every hook the kind reads or writes (+ the mask of context kinds)."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, T) if d.needs_context else (B * T,)
    acts = {h: 3.0 * torch.randn(*shape, D_MODEL, generator=g) for h in dict.fromkeys(d.in_hooks + d.out_hooks)}
    mask = torch.ones(B, T, dtype=torch.bool) if d.needs_context else None
    return acts, mask


def ctx() -> StepContext:
    return StepContext(k=K, l1_coefficient=1e-3, training=False)


cases = pytest.mark.parametrize("kind,activation", [(k, a) for k in kinds() for a in ACTIVATIONS])


@cases
def test_built_from_the_registry_with_declared_hooks(kind, activation):
    d = make(kind, activation)
    assert type(d) is dictionary_class(kind) and d.kind == kind
    assert set(d.in_hooks) | set(d.out_hooks) <= set(HOOKS) and d.in_hooks and d.out_hooks
    assert d.d_model == D_MODEL and d.d_sae >= 1
    assert isinstance(d.needs_context, bool)


@cases
def test_encode_decode_shapes_and_loss(kind, activation):
    d = make(kind, activation).train()
    raw, mask = raw_acts(d)
    normed = d.normalize(raw)
    f = d.encode({h: normed[h] for h in d.in_hooks}, StepContext(k=K, training=False))
    lead = (B, T) if d.needs_context else (B * T,)
    assert tuple(f.shape) == (*lead, d.d_sae)
    recon = d.decode_hooks(f, {h: normed[h] for h in d.in_hooks})
    assert list(recon) == d.out_hooks
    assert all(tuple(y.shape) == (*lead, D_MODEL) for y in recon.values())
    out = d(
        raw,
        StepContext(
            k=K, l1_coefficient=1e-3, sparsity_loss_type="tanh" if activation == "relu" else "none", training=True
        ),
        mask=mask,
    )
    assert isinstance(out, LossOutput) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert set(out.reconstruction) == set(d.out_hooks) and set(out.target) == set(d.out_hooks)
    out.loss.backward()
    grads = [p.grad for n, p in d.named_parameters() if not n.endswith("log_threshold")]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)


@cases
def test_save_and_load_round_trip(kind, activation, tmp_path):
    d = make(kind, activation).eval()
    raw, _ = raw_acts(d)
    d.save(tmp_path / "d")
    back = load_dictionary(tmp_path / "d").eval()
    assert type(back) is type(d) and back.in_hooks == d.in_hooks and back.out_hooks == d.out_hooks
    mine, theirs = d.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    with torch.no_grad():
        a, b = d.reconstruct(raw, ctx()), back.reconstruct(raw, ctx())
    for hook in d.out_hooks:
        torch.testing.assert_close(a[hook], b[hook], rtol=0, atol=0)


@cases
def test_param_groups_hold_every_trainable_parameter_once(kind, activation):
    d = make(kind, activation)
    groups = d.param_groups(lr=1e-3, jumprelu_lr_factor=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in d.parameters() if p.requires_grad}
    for g in groups:
        assert g["lr"] == (5e-4 if g["name"] == "jumprelu" else 1e-3)


@cases
def test_folding_the_scale_keeps_raw_outputs(kind, activation):
    d = make(kind, activation).eval()
    raw, _ = raw_acts(d)
    with torch.no_grad():
        before = d.reconstruct(raw, ctx())
        f_before = d.encode(d.normalize({h: raw[h] for h in d.in_hooks}), ctx())
        d.fold_activation_scale()
        assert d.folded and d.normalize(raw) is raw
        after = d.reconstruct(raw, ctx())
        f_after = d.encode(d.normalize({h: raw[h] for h in d.in_hooks}), ctx())
    for hook in d.out_hooks:
        torch.testing.assert_close(after[hook], before[hook], rtol=1e-4, atol=1e-4)
    # the same latents fire (their values move by the folded input scale)
    assert torch.equal(f_after.to_dense() != 0, f_before.to_dense() != 0)


@cases
def test_declared_capabilities_have_their_types(kind, activation):
    d = make(kind, activation).eval()
    assert isinstance(d.needs_model_init, bool)
    assert isinstance(d.has_context_extras(), bool)
    extras = d.analysis_extras()
    assert isinstance(extras, dict)
    assert all(isinstance(v, torch.Tensor) and v.shape[0] == d.d_sae for v in extras.values())
    own = d.dla_directions()
    assert own is None or tuple(own.shape) == (d.d_sae, D_MODEL)
    assert tuple(d.decoder_norms().shape) == (d.d_sae,)
    for hook in d.out_hooks:
        assert tuple(d.decoder_directions(hook).shape) == (d.d_sae, D_MODEL)
    if d.has_context_extras():
        raw, _ = raw_acts(d)
        normed = d.normalize({h: raw[h] for h in d.in_hooks})
        got = d.context_extras(normed, torch.arange(B) % d.d_sae, torch.full((B,), T - 1))
        assert all(isinstance(v, torch.Tensor) and v.shape[0] == B for v in got.values())
