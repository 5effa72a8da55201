"""saecli's exports loaded by the real libraries (the `interop` extra: sae-lens, eai-sparsify).

Slow (importing SAELens pulls TransformerLens); each library is skipped when it is not installed.
dictionary_learning is not here: its package imports nnsight at import time.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_interop import HOOK_IN, HOOK_OUT, _dictionary, _raw_batch

from saecli.dictionaries.registry import load_dictionary
from saecli.interop import export_dictionary

pytestmark = pytest.mark.slow
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's own switch to its CPU decoder


def _run(tmp_path, activation, kind="sae", skip=False):
    d = _dictionary(activation, kind, skip)
    d.fold_activation_scale()
    return d.save(tmp_path / "run")


def _saecli(run, x, kind):
    d = load_dictionary(run)
    with torch.no_grad():
        return d.reconstruct({HOOK_IN: x})[HOOK_OUT if kind == "transcoder" else HOOK_IN]


@pytest.mark.parametrize(
    "kind,activation,skip",
    [
        ("sae", "relu", False),
        ("sae", "topk", False),
        ("sae", "jumprelu", False),
        ("sae", "batchtopk", False),
        ("transcoder", "relu", False),
        ("transcoder", "relu", True),
        ("transcoder", "jumprelu", False),
    ],
)
def test_saelens_loads_the_export_and_reconstructs_as_saecli(tmp_path, kind, activation, skip):
    sae_lens = pytest.importorskip("sae_lens")
    run = _run(tmp_path, activation, kind, skip)
    export_dictionary(run, "saelens", tmp_path / "out")
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "out"), device="cpu")
    x = _raw_batch()
    with torch.no_grad():
        got = sae(x)
        f = sae.encode(x)
    assert torch.allclose(got, _saecli(run, x, kind), rtol=1e-4, atol=1e-4)
    assert torch.equal(f, load_dictionary(tmp_path / "out").encode(x))  # the same latents, by saecli's import


@pytest.mark.parametrize("kind,skip", [("sae", False), ("transcoder", False), ("transcoder", True)])
def test_sparsify_loads_the_export_and_reconstructs_as_saecli(tmp_path, kind, skip):
    sparsify = pytest.importorskip("sparsify")
    run = _run(tmp_path, "topk", kind, skip)
    export_dictionary(run, "sparsify", tmp_path / "out")
    coder = sparsify.SparseCoder.load_from_disk(tmp_path / "out" / HOOK_IN, device="cpu")
    x = _raw_batch()
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(x)
        got = coder.decode(top_acts, top_indices)
        if coder.W_skip is not None:
            got = got + x @ coder.W_skip.mT
    assert torch.allclose(got, _saecli(run, x, kind), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_a_folder_saelens_saved_loads_in_saecli_with_the_same_outputs(tmp_path, architecture):
    pytest.importorskip("sae_lens")
    from sae_lens.registry import get_sae_class

    cls, cfg_cls = get_sae_class(architecture)
    extra = {"k": 5} if architecture == "topk" else {}
    sae = cls(cfg_cls(d_in=16, d_sae=40, apply_b_dec_to_input=True, **extra))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(
                torch.rand(p.shape, generator=g) * 0.1 if name == "threshold" else torch.randn(p.shape, generator=g)
            )
    sae.cfg.metadata.hook_name = "blocks.2.hook_resid_post"
    sae.save_model(tmp_path / "sl")
    x = _raw_batch()
    mine = load_dictionary(tmp_path / "sl")
    with torch.no_grad():
        assert torch.allclose(mine(x), sae(x), rtol=1e-4, atol=1e-4)
        assert torch.allclose(mine.encode(x), sae.encode(x), rtol=1e-4, atol=1e-4)
    assert mine.in_hooks == ["blocks.2.hook_resid_post"]


@pytest.mark.parametrize("transcode", [False, True])
def test_a_folder_sparsify_saved_loads_in_saecli_with_the_same_outputs(tmp_path, transcode):
    sparsify = pytest.importorskip("sparsify")
    coder = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=40, k=5, transcode=transcode))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    coder.save_to_disk(tmp_path / "sp" / "layers.3")
    x = _raw_batch()
    with torch.no_grad():
        acts, idx, _ = coder.encode(x)
        want = coder.decode(acts, idx)
        got = load_dictionary(tmp_path / "sp")(x)  # the one hookpoint folder is found
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    if not transcode:  # sparsify's `layers.3` is the block's output
        assert load_dictionary(tmp_path / "sp").in_hooks == ["blocks.3.hook_resid_post"]
