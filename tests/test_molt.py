"""MOLT (mixture of linear transforms): hand-set forward math, sparse path = dense path, Frobenius-weighted
penalty, teacher → student recovery, save/load, folding on raw activations, config parsing."""

import math
from pathlib import Path

import pytest
import tomllib
import torch
from kinds_contract import assert_fold_keeps_raw_outputs, assert_resume_after_ctrl_c_is_exact

import saecli.dictionaries.molt as molt_module
from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.data.synthetic import SyntheticStream
from saecli.dictionaries.base import StepContext
from saecli.dictionaries.molt import MixtureOfLinearTransforms
from saecli.dictionaries.registry import build_dictionary, load_dictionary
from saecli.errors import ConfigError, UsageError

IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread is faster


def make(rank_counts, d=2, seed=0, **over):
    table = {"kind": "molt", "rank_counts": rank_counts, "norm_activation": "none", **over}
    cfg = parse(DictionaryConfig, table, key="sae")
    torch.manual_seed(seed)
    return build_dictionary(cfg, d, [IN, OUT])


def hand_set(**over):
    """d = 2; T0 (rank 1): x ↦ x₁·e₂; T1 (rank 1): x ↦ x₂·(1, 1); T2 (rank 2): diag(2, 3).
    Gate W_E = [e₁, e₂, e₁+e₂], b_E = (0, −3, −1); b_D = (0.5, −0.5)."""
    m = make({"1": 2, "2": 1}, **over)
    with torch.no_grad():
        m.V.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]]))  # rows: V0, V1, V2 (2 rows)
        m.U.copy_(torch.tensor([[0.0, 1], [1, 1], [2, 0], [0, 3]]))  # rows: U0ᵀ, U1ᵀ, U2's two columns
        m.W_E.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1]]))
        m.b_E.copy_(torch.tensor([0.0, -3, -1]))
        m.b_D.copy_(torch.tensor([0.5, -0.5]))
    return m


X = torch.tensor([[1.0, 2.0], [3.0, 0.0]])


# ---------------------------------------------------------------------------------- forward math
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_forward_on_hand_set_weights_relu(path, monkeypatch):
    monkeypatch.setattr(molt_module, "SPARSE_MAX_DENSITY", 2.0 if path == "sparse" else -1.0)
    m = hand_set(activation="relu")
    # token 1: h = (1, −1, 2) → f = (1, 0, 2): ŷ = 1·(0, 1) + 2·(2, 6) + b_D = (4.5, 12.5)
    # token 2: h = (3, −3, 2) → f = (3, 0, 2): ŷ = 3·(0, 3) + 2·(6, 0) + b_D = (12.5, 8.5)
    y = m.reconstruct({IN: X})[OUT]
    assert m.last_path == path
    assert torch.allclose(y, torch.tensor([[4.5, 12.5], [12.5, 8.5]]))
    assert torch.allclose(m.encode({IN: X}), torch.tensor([[1.0, 0, 2], [3, 0, 2]]))


def test_topk_gate_ranks_by_transform_norm():
    # ‖U_i V_i‖_F = (1, √2, √13). Token 2 has h = (3, −3, 2): ungated, T0 wins (3 > 2) → ŷ = 3·(0, 3) + b_D;
    # gated by the norms, T2 wins (2·√13 ≈ 7.2 > 3) → ŷ = 2·(6, 0) + b_D.
    ungated = hand_set(activation="topk", k=1, sparsity_include_decoder_norm=False)
    gated = hand_set(activation="topk", k=1)
    assert torch.allclose(gated.decoder_norms(), torch.tensor([1.0, math.sqrt(2), math.sqrt(13)]))
    assert torch.allclose(ungated.reconstruct({IN: X[1:]})[OUT], torch.tensor([[0.5, 8.5]]))
    assert torch.allclose(gated.reconstruct({IN: X[1:]})[OUT], torch.tensor([[12.5, -0.5]]))


def test_power_penalty_weights_each_gate_by_its_transform_norm():
    m = hand_set(activation="relu")
    ctx = StepContext(sparsity_loss_type="power", l1_coefficient=1.0)
    out = m({IN: X, OUT: torch.zeros(2, 2)}, ctx)
    # mean over tokens of Σ f_i‖U_iV_i‖: (1·1 + 2·√13 + 3·1 + 2·√13) / 2
    assert torch.allclose(out.terms["sparsity"], torch.tensor(2 + 2 * math.sqrt(13)))


def test_decoder_directions_are_the_top_singular_direction():
    m = hand_set(activation="relu")
    # T0 = e₂e₁ᵀ (σ₁ = 1, u₁ = e₂); T1 = (1,1)e₂ᵀ (σ₁ = √2, u₁ = (1,1)/√2); T2 = diag(2, 3) (σ₁ = 3, u₁ = e₂)
    assert torch.allclose(m.decoder_directions(), torch.tensor([[0.0, 1], [1, 1], [0, 3]]), atol=1e-6)


def test_decode_needs_the_input_the_gates_came_from():
    m = hand_set(activation="relu")
    f = m.encode({IN: X})
    with pytest.raises(UsageError, match="depends on its input"):
        m.decode_hooks(f)
    with pytest.raises(UsageError, match="transforms U_i V_i apply to the input"):
        m.decode(f)
    assert torch.allclose(m.decode_hooks(f, {IN: X})[OUT], torch.tensor([[4.5, 12.5], [12.5, 8.5]]))
    torch.testing.assert_close(m.decode(m.encode(X), X), m(X))


# ---------------------------------------------------------------------------------- sparse = dense
@pytest.mark.parametrize(
    "activation,penalty", [("topk", "none"), ("relu", "power"), ("relu", "tanh"), ("batchtopk", "none")]
)
def test_sparse_path_equals_dense_path(activation, penalty, monkeypatch):
    d, counts = 12, {"1": 30, "2": 20, "4": 10}
    ctx = StepContext(
        k=3,
        sparsity_loss_type=penalty,
        l1_coefficient=0.1,
        auxk_coefficient=0.1,
        k_aux=4,
        dead_mask=torch.arange(60) % 3 == 0,
        lp_coefficient=0.01,
    )
    x, y = torch.randn(40, d), torch.randn(40, d)
    results = {}
    for path, density in (("dense", -1.0), ("sparse", 2.0)):
        monkeypatch.setattr(molt_module, "SPARSE_MAX_DENSITY", density)
        m = make(counts, d=d, activation=activation, jumprelu_threshold_init=0.2)
        with torch.no_grad():
            m.b_E.normal_()
        out = m({IN: x, OUT: y}, ctx)
        out.loss.backward()
        assert out.extra["path"] == path
        results[path] = (out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    (a, ga), (b, gb) = results["dense"], results["sparse"]
    assert torch.allclose(a.loss, b.loss, rtol=1e-5)
    assert a.terms.keys() == b.terms.keys()
    assert ga.keys() == gb.keys()
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=1e-4, atol=1e-5), name


def test_masked_contexts_count_only_their_kept_positions():
    m = make({"1": 8, "2": 4}, d=6, k=2, activation="topk")
    x, y = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 0] = False
    out = m({IN: x, OUT: y}, StepContext(k=2), mask=mask)
    assert out.reconstruction[OUT].shape == (2, 5, 6) and out.feature_acts.shape == (2, 5, 12)
    flat = m({IN: x[:, 1:].reshape(-1, 6), OUT: y[:, 1:].reshape(-1, 6)}, StepContext(k=2))
    assert torch.allclose(out.terms["mse"], flat.terms["mse"])
    assert torch.allclose(out.reconstruction[OUT][:, 1:].reshape(-1, 6), flat.reconstruction[OUT])


def test_jumprelu_gates_always_take_the_dense_path(monkeypatch):
    """JumpReLU's threshold gradient needs ∂L/∂f at shut gates, which the sparse path does not compute."""
    monkeypatch.setattr(molt_module, "SPARSE_MAX_DENSITY", 2.0)
    m = make({"2": 8}, d=6, activation="jumprelu")
    out = m({IN: torch.randn(5, 6), OUT: torch.randn(5, 6)}, StepContext(sparsity_loss_type="tanh"))
    assert out.extra["path"] == "dense"


# ---------------------------------------------------------------------------------- training
def transform_matrices(m: MixtureOfLinearTransforms) -> torch.Tensor:
    """[n, d·d] each U_i V_i, flattened and unit-normalised (a loop is fine in a test)."""
    mats = []
    for i in range(m.d_sae):
        s, r = int(m.row_start[i]), int(m.rank_of[i])
        mats.append((m.U[s : s + r].T @ m.V[s : s + r]).reshape(-1))
    return torch.nn.functional.normalize(torch.stack(mats).detach(), dim=1)


def test_training_on_a_teacher_recovers_its_transforms():
    """A student of the same architecture (twice as many transforms), trained with plain Adam on
    (x, teacher(x)), ends with a loss far below its initial loss and finds the teacher's transforms up to
    permutation (and scale, which the gate can absorb). One rank: with mixed ranks a higher-rank student
    transform can absorb a lower-rank teacher transform, which simple training does not always undo; and
    with exactly as many transforms as the teacher, about one seed in three keeps one student transform
    straddling two teacher transforms (a local minimum of the routing)."""
    d, counts, k = 12, {"2": 6}, 2
    teacher = make(counts, d=d, k=k, seed=0)
    with torch.no_grad():
        teacher.W_E.copy_(torch.linalg.qr(torch.randn(d, d))[0][:6] * 3)  # well separated gates
        teacher.U.normal_()
        teacher.V.normal_(0, d**-0.5)
        teacher.set_transform_norms(3.0)
    student = make({"2": 12}, d=d, k=k, seed=2)
    steps = 1500
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    gen = torch.Generator().manual_seed(5)

    def batch(n: int = 256):
        x = torch.randn(n, d, generator=gen)
        with torch.no_grad():
            return x, teacher.reconstruct({IN: x})[OUT]

    ctx = StepContext(k=k, training=True)
    x, y = batch(2048)
    initial = float(student({IN: x, OUT: y}, ctx).terms["mse"])
    for _ in range(steps):
        xb, yb = batch()
        loss = student({IN: xb, OUT: yb}, ctx).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    final = float(student({IN: x, OUT: y}, StepContext(k=k, training=False)).terms["mse"])
    assert final < 0.05 * initial
    best = (transform_matrices(teacher) @ transform_matrices(student).T).max(1).values  # |cos| of U_iV_i
    assert int((best > 0.95).sum()) >= 5, best


# ---------------------------------------------------------------------------------- persistence, folding
def randomised(**over):
    m = make({"1": 8, "3": 4}, d=6, seed=1, norm_activation="dataset-wise", **over)
    with torch.no_grad():
        m.b_E.normal_(0, 0.5)
        m.b_D.normal_()
        m.U.mul_(3)
        m.set_dataset_norm(IN, 3.0)  # scale √6/3 on the input, √6/0.5 on the output: different
        m.set_dataset_norm(OUT, 0.5)
        if m.cfg.activation == "jumprelu":
            m.activation.log_threshold.copy_(torch.rand(m.d_sae).mul(0.3).add(0.05).log())
        if m.cfg.activation == "batchtopk":
            m.activation.threshold.fill_(0.3)
    return m


def test_save_load_round_trip(tmp_path):
    m = randomised(activation="jumprelu", k=2)
    m.save(tmp_path / "molt")
    back = load_dictionary(tmp_path / "molt")
    assert isinstance(back, MixtureOfLinearTransforms)
    assert back.cfg.ranks() == [(1, 8), (3, 4)] and back.d_sae == 12 and back.total_rank == 20
    assert back.in_hooks == [IN] and back.out_hooks == [OUT]
    for name, value in m.state_dict().items():
        assert torch.equal(value, back.state_dict()[name]), name
    x = torch.randn(10, 6)
    assert torch.equal(m.reconstruct({IN: x})[OUT], back.reconstruct({IN: x})[OUT])


@pytest.mark.parametrize(
    "activation,gated", [("topk", True), ("jumprelu", True), ("jumprelu", False), ("batchtopk", True), ("relu", False)]
)
def test_fold_activation_scale_keeps_raw_outputs(activation, gated, tmp_path):
    m = randomised(activation=activation, k=2, sparsity_include_decoder_norm=gated)
    assert_fold_keeps_raw_outputs(m, IN, OUT, torch.randn(64, 6) * 3, tmp_path / "folded", latent_atol=1e-6)


# ---------------------------------------------------------------------------------- config
def test_rank_counts_parse_from_toml_with_string_keys():
    table = tomllib.loads('[sae]\nkind = "molt"\nk = 4\nrank_counts = { "16" = 8, "4" = 64 }\n')["sae"]
    cfg = parse(DictionaryConfig, table, key="sae")
    assert cfg.ranks() == [(4, 64), (16, 8)] and cfg.d_sae == 72
    bare = tomllib.loads('[sae]\nkind = "molt"\nk = 4\n[sae.rank_counts]\n1 = 10\n2 = 5\n')["sae"]
    assert parse(DictionaryConfig, bare, key="sae").ranks() == [(1, 10), (2, 5)]
    m = build_dictionary(cfg, 32, [IN, OUT])
    assert m.d_sae == 72 and m.total_rank == 4 * 64 + 16 * 8
    assert m.V.shape == (384, 32) and m.U.shape == (384, 32) and m.W_E.shape == (72, 32)


@pytest.mark.parametrize(
    "table,key",
    [
        ({}, "sae.rank_counts"),
        ({"rank_counts": {"four": 3}}, "sae.rank_counts.four"),
        ({"rank_counts": {"0": 3}}, "sae.rank_counts.0"),
        ({"rank_counts": {"4": 0}}, "sae.rank_counts.4"),
        ({"rank_counts": {"4": 8}, "d_sae": 10}, "sae.d_sae"),
        ({"rank_counts": {"4": 8}, "expansion_factor": 2.0}, "sae.expansion_factor"),
        ({"rank_counts": {"4": 8}, "norm_activation": "token-wise"}, "sae.norm_activation"),
        ({"rank_counts": {"4": 8}, "k": 9}, "sae.k"),
    ],
)
def test_bad_configs_name_the_key(table, key):
    with pytest.raises(ConfigError) as exc:
        parse(DictionaryConfig, {"kind": "molt", "k": 2, **table}, key="sae")
    assert exc.value.key == key


def test_hooks_default_to_the_stream_order_and_must_differ():
    cfg = parse(DictionaryConfig, {"kind": "molt", "rank_counts": {"2": 4}, "k": 2}, key="sae")
    m = build_dictionary(cfg, 8, [IN, OUT])
    assert (m.in_hook, m.out_hook) == (IN, OUT)
    with pytest.raises(ConfigError):
        build_dictionary(cfg, 8, [IN])


@pytest.mark.parametrize("path", ["experiments/tiny/molt.toml", "experiments/smollm2/molt.toml"])
def test_example_experiments_parse(path):
    from saecli.config.load import load_experiment

    exp = load_experiment(REPO / path)
    assert exp.dictionary.kind == "molt" and exp.dictionary.d_sae == sum(c for _, c in exp.dictionary.ranks())


def test_resume_after_ctrl_c_is_exact(tmp_path):
    """Killed mid-run and resumed, a MOLT (JumpReLU gate, tanh penalty) ends as an uninterrupted run."""
    assert_resume_after_ctrl_c_is_exact(
        tmp_path,
        {"kind": "molt", "rank_counts": {"1": 8, "2": 4}, "activation": "jumprelu"},
        {"total_training_tokens": 64 * 20, "log_frequency": 4},
        lambda: SyntheticStream(d_model=8, n_atoms=16, k=3, batch_size=64, hook_points=[IN, OUT]),
        at=8,
        saved="activation.log_threshold",
    )
