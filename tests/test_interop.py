"""Export to SAELens / sparsify / dictionary_learning and import back, with the numeric self-check.

Every dictionary here is trained-looking (random weights, a dataset-wise input scale of 0.25 folded in,
decoder rows of unequal norm), so a missed scale, transpose or norm would change the numbers.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.dictionaries.registry import build_dictionary, load_dictionary
from saecli.errors import UsageError
from saecli.interop import SelfCheckError, detect_format, export_dictionary

D, S = 16, 48
HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def _dictionary(activation: str, kind: str = "sae", skip: bool = False, **over):
    table = {"kind": kind, "d_sae": S, "activation": activation, "k": 6, **over}
    if kind == "transcoder":
        table.update(hook_point_in=HOOK_IN, hook_point_out=HOOK_OUT, skip_connection=skip)
    hooks = [HOOK_IN, HOOK_OUT] if kind == "transcoder" else [HOOK_IN]
    d = build_dictionary(parse(DictionaryConfig, table, key="sae"), D, hooks)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        d.W_enc.copy_(torch.randn(S, D, generator=g) / D**0.5)
        d.b_enc.copy_(0.1 * torch.randn(S, generator=g))
        d.W_dec.copy_(torch.randn(S, D, generator=g) * torch.rand(S, 1, generator=g) + 0.01)
        d.b_dec.copy_(0.2 * torch.randn(D, generator=g))
        if skip:
            d.W_skip.copy_(0.1 * torch.randn(D, D, generator=g))
        if activation == "jumprelu":
            d.activation.log_threshold.copy_((0.05 + 0.2 * torch.rand(S, generator=g)).log())
        if activation == "batchtopk":
            d.activation.threshold.fill_(0.15)
    for hook in hooks:
        d.set_dataset_norm(hook, D**0.5 / (0.25 if hook == HOOK_IN else 0.5))
    return d.eval()


def _raw_batch(n: int = 64) -> torch.Tensor:
    return 4.0 * torch.randn(n, D, generator=torch.Generator().manual_seed(2))


def _saved(tmp_path, d, fold: bool = True):
    if fold:
        d.fold_activation_scale()
    return d.save(tmp_path / "run")


def _check_same(original, loaded, hook_in, hook_out):
    x = _raw_batch()
    with torch.no_grad():
        y0 = original.reconstruct({hook_in: x})[hook_out]
        y1 = loaded.reconstruct({hook_in: x})[hook_out]
    assert torch.allclose(y0, y1, rtol=1e-4, atol=1e-4), (y0 - y1).abs().max()


ROUND_TRIPS = [
    ("saelens", "sae", "relu", False),
    ("saelens", "sae", "topk", False),
    ("saelens", "sae", "batchtopk", False),
    ("saelens", "sae", "jumprelu", False),
    ("saelens", "transcoder", "relu", False),
    ("saelens", "transcoder", "relu", True),
    ("saelens", "transcoder", "jumprelu", False),
    ("sparsify", "sae", "topk", False),
    ("sparsify", "transcoder", "topk", False),
    ("sparsify", "transcoder", "topk", True),
    ("dictionary_learning", "sae", "relu", False),
    ("dictionary_learning", "sae", "topk", False),
    ("dictionary_learning", "sae", "batchtopk", False),
    ("dictionary_learning", "sae", "jumprelu", False),
]


@pytest.mark.parametrize("fmt,kind,activation,skip", ROUND_TRIPS)
def test_export_then_import_reconstructs_raw_activations_as_saecli_does(tmp_path, fmt, kind, activation, skip):
    original = _dictionary(activation, kind, skip)
    run = _saved(tmp_path, original)
    result = export_dictionary(run, fmt, tmp_path / "out")
    assert result["metrics"]["l0"] > 0  # the reference batch makes latents fire
    name, _ = detect_format(tmp_path / "out")
    assert name == fmt
    loaded = load_dictionary(tmp_path / "out")
    hook_out = HOOK_OUT if kind == "transcoder" else HOOK_IN
    _check_same(load_dictionary(run), loaded, HOOK_IN, hook_out)


def test_a_bfloat16_dictionary_exports_in_bfloat16_within_its_tolerance(tmp_path):
    # gated: ranking h·‖W_dec‖ keeps a bf16 near-tie swap small even with these test rows' 100× spread of
    # decoder norms (ranked by h alone, a swap trades a tiny row for a large one)
    original = _dictionary("topk", dtype="bfloat16", sparsity_include_decoder_norm=True)
    run = _saved(tmp_path, original)
    export_dictionary(run, "saelens", tmp_path / "out")
    assert json.loads((tmp_path / "out/cfg.json").read_text())["dtype"] == "bfloat16"
    assert load_file(str(tmp_path / "out/sae_weights.safetensors"))["W_enc"].dtype == torch.bfloat16
    x = _raw_batch().to(torch.bfloat16)
    with torch.no_grad():
        y0 = load_dictionary(run).reconstruct({HOOK_IN: x})[HOOK_IN].float()
        y1 = load_dictionary(tmp_path / "out").reconstruct({HOOK_IN: x})[HOOK_IN].float()
    # bf16 rounding differs between ranking h·‖W_dec‖ and the folded h: near-ties of TopK may swap
    assert (y0 - y1).norm() / y0.norm() < 0.1


def test_an_unfolded_run_exports_with_its_scale_folded(tmp_path):
    original = _dictionary("topk", apply_decoder_bias_to_pre_encoder=True)
    run = _saved(tmp_path, original, fold=False)
    export_dictionary(run, "saelens", tmp_path / "out")
    _check_same(load_dictionary(run), load_dictionary(tmp_path / "out"), HOOK_IN, HOOK_IN)


def test_token_wise_scaling_exports_as_saelens_constant_norm_rescale(tmp_path):
    run = _saved(tmp_path, _dictionary("relu", norm_activation="token-wise"))
    export_dictionary(run, "saelens", tmp_path / "out")
    assert json.loads((tmp_path / "out/cfg.json").read_text())["normalize_activations"] == "constant_norm_rescale"
    _check_same(load_dictionary(run), load_dictionary(tmp_path / "out"), HOOK_IN, HOOK_IN)


def test_saelens_layout_uses_its_key_names_and_shapes(tmp_path):
    run = _saved(tmp_path, _dictionary("jumprelu"))
    export_dictionary(run, "saelens", tmp_path / "out")
    cfg = json.loads((tmp_path / "out/cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_in"] == D and cfg["d_sae"] == S
    assert cfg["metadata"]["hook_name"] == HOOK_IN and cfg["hook_name"] == HOOK_IN
    w = load_file(str(tmp_path / "out/sae_weights.safetensors"))
    assert w["W_enc"].shape == (D, S) and w["W_dec"].shape == (S, D) and w["threshold"].shape == (S,)
    assert (tmp_path / "out/reference.safetensors").exists()


def test_sparsify_writes_one_folder_per_hookpoint(tmp_path):
    run = _saved(tmp_path, _dictionary("topk"))
    export_dictionary(run, "sparsify", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / HOOK_IN / "cfg.json").read_text())
    assert cfg["k"] == 6 and cfg["num_latents"] == S and cfg["d_in"] == D and not cfg["transcode"]


def test_a_mis_scaled_decoder_fails_the_self_check_naming_the_reconstruction(tmp_path):
    run = _saved(tmp_path, _dictionary("relu"))
    export_dictionary(run, "saelens", tmp_path / "out")
    path = tmp_path / "out/sae_weights.safetensors"
    w = load_file(str(path))
    w["W_dec"] = w["W_dec"] * 2
    save_file(w, str(path))
    with pytest.raises(SelfCheckError, match="the reconstruction differs"):
        load_dictionary(tmp_path / "out")


def test_dictionary_learning_decoder_norms_move_into_the_features_as_its_loader_does(tmp_path):
    run = _saved(tmp_path, _dictionary("relu"))
    export_dictionary(run, "dictionary_learning", tmp_path / "out")
    state = torch.load(tmp_path / "out/ae.pt")
    assert torch.allclose(state["decoder.weight"].norm(dim=0), torch.ones(S), atol=1e-5)
    state["decoder.weight"] = state["decoder.weight"] * 2  # its loader would renormalise: the features double
    torch.save(state, tmp_path / "out/ae.pt")
    with pytest.raises(SelfCheckError, match="feature activations differ"):
        load_dictionary(tmp_path / "out")


def test_a_mis_scaled_encoder_fails_the_self_check_naming_the_features(tmp_path):
    run = _saved(tmp_path, _dictionary("jumprelu"))
    export_dictionary(run, "saelens", tmp_path / "out")
    path = tmp_path / "out/sae_weights.safetensors"
    w = load_file(str(path))
    w["W_enc"] = w["W_enc"] * 1.5
    save_file(w, str(path))
    with pytest.raises(SelfCheckError, match="L0|firing|feature activations"):
        load_dictionary(tmp_path / "out")


def test_a_transposed_square_encoder_fails_the_self_check(tmp_path):
    d = build_dictionary(parse(DictionaryConfig, {"d_sae": D, "activation": "relu"}, key="sae"), D, [HOOK_IN])
    run = d.save(tmp_path / "run")
    export_dictionary(run, "saelens", tmp_path / "out")
    path = tmp_path / "out/sae_weights.safetensors"
    w = load_file(str(path))
    w["W_enc"] = w["W_enc"].T.contiguous()
    save_file(w, str(path))
    with pytest.raises(SelfCheckError, match="self-check failed"):
        load_dictionary(tmp_path / "out")


@pytest.mark.parametrize(
    "fmt,kind,activation,skip,needle",
    [
        ("sparsify", "sae", "relu", False, "--format saelens"),
        ("saelens", "transcoder", "topk", False, "--format sparsify"),
        ("dictionary_learning", "transcoder", "relu", False, "--format saelens"),
        ("saelens", "transcoder", "jumprelu", True, "no format holds"),
    ],
)
def test_a_kind_a_format_cannot_hold_names_the_formats_that_can(tmp_path, fmt, kind, activation, skip, needle):
    run = _saved(tmp_path, _dictionary(activation, kind, skip))
    with pytest.raises(UsageError, match=needle):
        export_dictionary(run, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_multi_hook_kinds_are_refused_with_the_reason(tmp_path):
    cfg = parse(DictionaryConfig, {"kind": "crosscoder", "d_sae": 8, "k": 2}, key="sae")
    run = build_dictionary(cfg, D, ["a", "b"]).save(tmp_path / "run")
    with pytest.raises(UsageError, match="single-hook kinds"):
        export_dictionary(run, "saelens", tmp_path / "out")


def test_exporting_over_the_run_itself_is_refused(tmp_path):
    run = _saved(tmp_path, _dictionary("topk"))
    for out in (run, tmp_path):
        with pytest.raises(UsageError, match="another folder"):
            export_dictionary(run, "saelens", out, overwrite=True)
    assert load_dictionary(run).d_sae == S


def test_an_existing_output_folder_needs_overwrite(tmp_path):
    run = _saved(tmp_path, _dictionary("topk"))
    export_dictionary(run, "saelens", tmp_path / "out")
    with pytest.raises(UsageError, match="--overwrite"):
        export_dictionary(run, "saelens", tmp_path / "out")
    export_dictionary(run, "sparsify", tmp_path / "out", overwrite=True)
    assert detect_format(tmp_path / "out")[0] == "sparsify"


def test_a_saelens_folder_from_saelens_itself_loads(tmp_path):
    """No reference batch (a file SAELens wrote): apply_b_dec_to_input and rescaled TopK still load exactly."""
    g = torch.Generator().manual_seed(3)
    w = {
        "W_enc": torch.randn(D, S, generator=g),
        "b_enc": torch.randn(S, generator=g),
        "W_dec": torch.randn(S, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }
    (tmp_path / "sl").mkdir()
    save_file(w, str(tmp_path / "sl/sae_weights.safetensors"))
    cfg = {
        "architecture": "topk",
        "d_in": D,
        "d_sae": S,
        "k": 5,
        "apply_b_dec_to_input": True,
        "rescale_acts_by_decoder_norm": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.0.hook_resid_post", "sae_lens_version": "6.5.0"},
    }
    (tmp_path / "sl/cfg.json").write_text(json.dumps(cfg))
    sae = load_dictionary(tmp_path / "sl")
    x = _raw_batch()
    # SAELens' maths, written out: rank (x − b_dec) W_enc + b_enc scaled by ‖W_dec‖, decode f/‖W_dec‖
    n = w["W_dec"].norm(dim=1)
    h = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * n
    vals, idx = h.topk(5, dim=-1)
    f = torch.zeros_like(h).scatter(-1, idx, vals.relu())
    expected = (f / n) @ w["W_dec"] + w["b_dec"]
    got = sae(x)
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.allclose(sae.encode(x), f, atol=1e-4)  # SAELens reports h·‖W_dec‖ as the features


def test_native_run_folders_still_load_natively(tmp_path):
    run = _saved(tmp_path, _dictionary("topk", sparsity_include_decoder_norm=True))
    assert detect_format(run) is None
    assert load_dictionary(run).cfg.sparsity_include_decoder_norm  # its own config, not an import's


def test_a_damaged_foreign_file_is_a_usage_error_naming_it(tmp_path):
    run = _saved(tmp_path, _dictionary("relu"))
    export_dictionary(run, "saelens", tmp_path / "out")
    (tmp_path / "out/sae_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="sae_weights.safetensors|cannot be read"):
        load_dictionary(tmp_path / "out")
