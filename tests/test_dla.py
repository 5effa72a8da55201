"""DLA: a feature's direction through the model's real final norm and unembedding, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_analyze import ToyDictionary

from saecli.analysis.dla import DLAResult, NormAsLinear, direct_logit_attribution, dla_result, feature_directions
from saecli.config.model import ModelConfig
from saecli.lm import final_norm_and_unembed, load_model

D = 64


def loaded(folder):
    """The tiny model with random (non-trivial) final-norm weights and biases, so that they matter."""
    lm = load_model(ModelConfig(name=str(folder), device="cpu"))
    norm, _ = final_norm_and_unembed(lm)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=g) * 2 + 0.2)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(D, generator=g))
    return lm


def directions(n: int = 5) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(3)) * 3


def test_llama_by_hand(tiny_llama):
    """RMSNorm: logits = (v ⊙ weight) @ lm_head.weightᵀ (untied embeddings)."""
    lm = loaded(tiny_llama)
    model = lm.model
    assert not model.config.tie_word_embeddings
    v = directions()
    hand = (v * model.model.norm.weight) @ model.lm_head.weight.T
    norm, W_U = final_norm_and_unembed(lm)
    pos_v, pos_i, neg_v, neg_i = direct_logit_attribution(v, norm, W_U, top=7)
    want = hand.topk(7, dim=1)
    assert torch.equal(pos_i, want.indices)
    torch.testing.assert_close(pos_v, want.values, rtol=1e-5, atol=1e-5)
    low = hand.topk(7, dim=1, largest=False)
    assert torch.equal(neg_i, low.indices)
    torch.testing.assert_close(neg_v, low.values, rtol=1e-5, atol=1e-5)
    # the model's own path: logits of a residual equal to v, times the rms the norm divided by
    real = (
        model.lm_head(model.model.norm(v))
        * (v.pow(2).mean(-1, keepdim=True) + model.model.norm.variance_epsilon).sqrt()
    )
    torch.testing.assert_close(NormAsLinear(norm, D, torch.device("cpu"))(v) @ W_U, real, rtol=1e-4, atol=1e-4)


def test_gpt2_by_hand(tiny_gpt2):
    """LayerNorm: logits = ((v − mean v) ⊙ weight) @ wteᵀ (tied embeddings); its bias is dropped."""
    lm = loaded(tiny_gpt2)
    model = lm.model
    ln = model.transformer.ln_f
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    v = directions()
    hand = ((v - v.mean(-1, keepdim=True)) * ln.weight) @ model.transformer.wte.weight.T
    norm, W_U = final_norm_and_unembed(lm)
    pos_v, pos_i, neg_v, neg_i = direct_logit_attribution(v, norm, W_U, top=5)
    assert torch.equal(pos_i, hand.topk(5, dim=1).indices)
    torch.testing.assert_close(pos_v, hand.topk(5, dim=1).values, rtol=1e-5, atol=1e-4)
    assert torch.equal(neg_i, hand.topk(5, dim=1, largest=False).indices)
    # the model's own path, with the bias's logits removed and the std put back
    real = model.lm_head(ln(v)) - model.lm_head(ln.bias)
    real = real * (v.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    torch.testing.assert_close(hand, real, rtol=1e-4, atol=1e-4)
    assert NormAsLinear(norm, D, torch.device("cpu")).centred


@pytest.mark.parametrize("family", ["gpt_neox", "gemma"])
def test_other_families_match_the_real_norm(tiny_models, family):
    """neox (LayerNorm, untied) and gemma (RMSNorm with 1 + weight, tied): the model's logits of v."""
    lm = loaded(tiny_models[family])
    norm, W_U = final_norm_and_unembed(lm)
    v = directions()
    with torch.no_grad():
        bias = norm(torch.zeros(1, D))
        lin = NormAsLinear(norm, D, torch.device("cpu"))
        p = v - v.mean(-1, keepdim=True) if lin.centred else v
        real = lm.model.get_output_embeddings()(norm(v) - bias) * (p.pow(2).mean(-1, keepdim=True) + lin.eps).sqrt()
        torch.testing.assert_close(lin(v) @ W_U, real, rtol=1e-4, atol=1e-4)
    assert lin.centred == (family == "gpt_neox")
    if family == "gemma":
        hand = (v * (1 + norm.weight)) @ W_U
        torch.testing.assert_close(lin(v) @ W_U, hand, rtol=1e-4, atol=1e-4)


def test_chunking_changes_nothing(tiny_llama):
    lm = loaded(tiny_llama)
    norm, W_U = final_norm_and_unembed(lm)
    v = directions(13)
    whole = direct_logit_attribution(v, norm, W_U, top=4)
    chunked = direct_logit_attribution(v, norm, W_U, top=4, chunk_elements=3 * W_U.shape[1])
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


def test_several_out_hooks_are_summed_in_raw_units():
    """A CLT-like dictionary: directions = Σ over out hooks, each divided by its dataset-wise scale."""
    d = ToyDictionary(
        D, 6, ["blocks.0.ln2.hook_normalized"], ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"], norm="dataset-wise"
    )
    d.set_dataset_norm("blocks.0.hook_mlp_out", 4.0)  # scale √64 / 4 = 2
    d.set_dataset_norm("blocks.1.hook_mlp_out", 16.0)  # scale 0.5
    want = d.W_dec[0] / 2.0 + d.W_dec[1] / 0.5
    torch.testing.assert_close(feature_directions(d), want.detach())
    d.folded = True
    torch.testing.assert_close(feature_directions(d), (d.W_dec[0] + d.W_dec[1]).detach())


def test_dla_result_names_tokens_and_round_trips(tiny_gpt2, tmp_path):
    lm = loaded(tiny_gpt2)
    d = ToyDictionary(D, 4, ["blocks.1.hook_resid_post"])
    res = dla_result(d, lm, top=3)
    rec = res.feature(2)
    assert len(rec["top_positive"]) == 3 and len(rec["top_negative"]) == 3
    first = rec["top_positive"][0]
    assert first["token"] == lm.tokenizer.decode([first["id"]])
    assert rec["top_positive"][0]["logit"] >= rec["top_positive"][1]["logit"]
    assert rec["top_negative"][0]["logit"] <= rec["top_negative"][1]["logit"]
    res.save(tmp_path)
    back = type(res).load(tmp_path)
    assert back.feature(2)["top_positive"][0]["id"] == first["id"]
    assert back.meta["norm"].startswith("layernorm")


def test_dla_command(tmp_path, tiny_llama, cli):
    from test_analyze import experiment

    exp = experiment(tmp_path, tiny_llama)
    res = cli("dla", exp, "--top", "4", "--feature", "2", "--feature", "5")
    assert res.exit_code == 0, res
    assert "promotes" in res.stdout and "dla:" in res.stdout
    back = DLAResult.load(tmp_path / "run")
    assert back.pos_ids.shape == (96, 4) and back.meta["norm"].startswith("rmsnorm")

    from saecli.config.run import StoreConfig
    from saecli.dictionaries.registry import load_dictionary
    from saecli.store import open_store

    # the file agrees with a direct computation from the saved weights
    lm = load_model(ModelConfig(name=str(tiny_llama), device="cpu"))
    norm, W_U = final_norm_and_unembed(lm)
    d = load_dictionary(tmp_path / "run")
    want = direct_logit_attribution(feature_directions(d), norm, W_U, top=4)
    assert np.array_equal(back.pos_ids, want[1].numpy())
    with open_store(StoreConfig(backend="sqlite", path=str(tmp_path / "store.db"))) as store:
        rec = store.get_feature("tiny-sae", "default", 5)
        assert [t["id"] for t in rec["logits"]["top_positive"]] == want[1][5].tolist()
    bad = cli("dla", exp, "--feature", "999")
    assert bad.exit_code == 2 and "999" in bad.output
