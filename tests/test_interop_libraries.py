"""saecli's exports loaded by the real libraries (the `interop` extra: sae-lens, eai-sparsify).

Slow (importing SAELens pulls TransformerLens); each library is skipped when it is not installed.
dictionary_learning is not here: its package imports nnsight at import time.
"""

from __future__ import annotations

import pytest
import torch

from saecli.dictionaries.registry import load_dictionary
from saecli.interop import export_dictionary
from test_interop import HOOK_IN, HOOK_OUT, _dictionary, _raw_batch

pytestmark = pytest.mark.slow


def _run(tmp_path, activation, kind="sae", skip=False):
    d = _dictionary(activation, kind, skip)
    d.fold_activation_scale()
    return d.save(tmp_path / "run")


def _saecli(run, x, kind):
    d = load_dictionary(run)
    with torch.no_grad():
        return d.reconstruct({HOOK_IN: x})[HOOK_OUT if kind == "transcoder" else HOOK_IN]


@pytest.mark.parametrize("kind,activation,skip", [
    ("sae", "relu", False), ("sae", "topk", False), ("sae", "jumprelu", False), ("sae", "batchtopk", False),
    ("transcoder", "relu", False), ("transcoder", "relu", True), ("transcoder", "jumprelu", False),
])
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
