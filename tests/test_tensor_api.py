"""The plain-tensor API of a loaded dictionary, as the README shows it:

    d = load_dictionary(folder); f = d.encode(x); d.decode(f) == d(x)

raw activations in, raw reconstructions out, whether the folder holds folded weights or not."""

from __future__ import annotations

import pytest
import torch

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.dictionaries.base import Dictionary
from saecli.dictionaries.registry import build_dictionary, load_dictionary
from saecli.errors import UsageError

D, S = 8, 24
RESID = "blocks.1.hook_resid_post"
MLP_IN, MLP_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread is faster


def saved(tmp_path, table: dict, hooks: list[str], fold: bool = True):
    """A dictionary trained in units 3× smaller than the raw activations, saved (folded or not) and loaded."""
    torch.manual_seed(0)  # the same weights whether folded or not
    d = build_dictionary(parse(DictionaryConfig, {"d_sae": S, "k": 4, **table}, key="sae"), D, hooks)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.startswith(("b_", "W_skip")):
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    if getattr(d.cfg, "norm_activation", "none") == "dataset-wise":
        for hook in hooks:
            d.set_dataset_norm(hook, 3.0 * D**0.5)
    if fold:
        d.fold_activation_scale()
    return load_dictionary(d.save(tmp_path / ("folded" if fold else "unfolded")))


def raw(n: int = 32) -> torch.Tensor:
    return 3.0 * torch.randn(n, D, generator=torch.Generator().manual_seed(7))


SINGLE_OUTPUT = [
    pytest.param({"kind": "sae", "activation": "topk"}, [RESID], id="sae-topk"),
    pytest.param({"kind": "sae", "activation": "relu"}, [RESID], id="sae-relu"),
    pytest.param(
        {"kind": "sae", "activation": "jumprelu", "jumprelu_threshold_init": 0.05}, [RESID], id="sae-jumprelu"
    ),
    pytest.param({"kind": "transcoder", "activation": "topk"}, [MLP_IN, MLP_OUT], id="transcoder"),
]


@pytest.mark.parametrize("table,hooks", SINGLE_OUTPUT)
def test_decode_of_encode_is_the_reconstruction_in_raw_units(tmp_path, table, hooks):
    x = raw()
    with torch.no_grad():
        d = saved(tmp_path, table, hooks)
        f = d.encode(x)
        torch.testing.assert_close(d.decode(f), d(x))
        assert 0 < int((f != 0).sum(-1).max()) and d.decode(f).shape == x.shape
        # the unfolded copy (normalised weights + scales) answers in the same raw units
        unfolded = saved(tmp_path, table, hooks, fold=False)
        torch.testing.assert_close(unfolded.decode(unfolded.encode(x)), d(x), rtol=1e-4, atol=1e-4)


def test_decode_of_edited_latents_is_what_they_write():
    """decode(f) is linear in f (plus the bias): steering by adding a latent adds its raw decoder row."""
    d = build_dictionary(
        parse(DictionaryConfig, {"kind": "sae", "d_sae": S, "activation": "relu"}, key="sae"), D, [RESID]
    )
    d.set_dataset_norm(RESID, 3.0 * D**0.5)  # trained in units 3× smaller than the raw ones
    with torch.no_grad():
        f = d.encode(raw(4))
        steered = f.clone()
        steered[:, 5] += 2.0
        torch.testing.assert_close(d.decode(steered) - d.decode(f), (2.0 * 3.0 * d.W_dec[5]).expand(4, D))


def test_a_skip_transcoder_decodes_with_its_input(tmp_path):
    x = raw()
    with torch.no_grad():
        d = saved(tmp_path, {"kind": "transcoder", "activation": "topk", "skip_connection": True}, [MLP_IN, MLP_OUT])
        f = d.encode(x)
        with pytest.raises(UsageError, match=r"skip connection adds x·W_skip.*decode\(f, x\)"):
            d.decode(f)
        torch.testing.assert_close(d.decode(f, x), d(x))
        latent_part = d.decode_hooks(f)[MLP_OUT]  # folded: raw units
        torch.testing.assert_close(latent_part + x @ d.W_skip, d(x))


def test_token_wise_scaling_needs_the_input_to_scale_back(tmp_path):
    x = raw()
    with torch.no_grad():
        d = saved(tmp_path, {"kind": "sae", "activation": "topk", "norm_activation": "token-wise"}, [RESID])
        f = d.encode(x)
        with pytest.raises(UsageError, match="token-wise.*its own input's norm"):
            d.decode(f)
        torch.testing.assert_close(d.decode(f, x), d(x))


def test_a_molt_decodes_with_its_input(tmp_path):
    x = raw()
    with torch.no_grad():
        d = saved(
            tmp_path,
            {"kind": "molt", "activation": "topk", "rank_counts": {"2": 4, "1": 8}, "d_sae": 12},
            [MLP_IN, MLP_OUT],
        )
        f = d.encode(x)
        with pytest.raises(UsageError, match="transforms U_i V_i apply to the input"):
            d.decode(f)
        torch.testing.assert_close(d.decode(f, x), d(x))


def test_a_lorsa_decodes_one_context(tmp_path):
    x = raw(6)  # one context [T, d]
    with torch.no_grad():
        d = saved(
            tmp_path,
            {"kind": "lorsa", "activation": "topk", "k": 2, "n_qk_heads": 2},
            ["blocks.1.ln1.hook_normalized", "blocks.1.hook_attn_out"],
        )
        torch.testing.assert_close(d.decode(d.encode(x)), d(x))


def test_a_multi_hook_kind_says_to_use_decode_hooks_or_reconstruct(tmp_path):
    heads = ["base/" + RESID, "chat/" + RESID]
    with torch.no_grad():
        cc = saved(tmp_path, {"kind": "crosscoder", "activation": "topk"}, heads)
        f = cc.encode({h: raw() for h in heads})
        with pytest.raises(UsageError, match=r"reconstructs 2 hook points.*decode_hooks\(f\).*reconstruct"):
            cc.decode(f)
        assert set(cc.decode_hooks(f)) == set(heads)


def test_a_kind_implements_decode_hooks_not_decode():
    with pytest.raises(TypeError, match="implements decode_hooks"):
        type("Mine", (Dictionary,), {"decode": lambda self, f: {}})
