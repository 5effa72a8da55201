"""The trainer's defaults: each formula pinned with hand numbers (the measurements behind them:
bench_quality.py), resolved into the config (at load, then with the stream) and written to config.toml,
so a run folder says what ran and an older folder without these keys resumes to the same result."""

from __future__ import annotations

import math
import warnings

import pytest
from kinds_contract import CtrlCAt, assert_same_weights

from saecli.config.base import parse
from saecli.config.defaults import (
    default_dead_threshold_tokens,
    default_k_aux,
    default_l1_coefficient,
    default_lr,
    default_sparsity_loss,
    resolve_trainer,
    unresolved,
)
from saecli.config.dictionary import DictionaryConfig
from saecli.config.load import experiment_from_dict, load_experiment, read_toml
from saecli.config.trainer import TrainerConfig
from saecli.data.synthetic import SyntheticStream
from saecli.dictionaries.registry import build_dictionary
from saecli.errors import ConfigError
from saecli.runs import run_sweep, train
from saecli.training import Member

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_lr_is_4e3_at_d_sae_4608_and_falls_as_one_over_root_d_sae_above():
    assert default_lr(4608) == pytest.approx(4e-3)
    assert default_lr(4 * 4608) == pytest.approx(2e-3)  # 4× the latents: half the lr
    assert default_lr(2**16) == pytest.approx(4e-3 * (4608 / 2**16) ** 0.5)  # ≈ 1.06e-3
    assert default_lr(64) == pytest.approx(4e-3)  # never above the measured best


def test_default_lr_falls_as_one_over_root_run_tokens_beyond_300k():
    assert default_lr(4608, 300_000) == default_lr(4608, 1000) == pytest.approx(4e-3)
    assert default_lr(4608, 1_200_000) == pytest.approx(2e-3)  # 4× the tokens: half the lr (measured: 2e-3 won)
    assert default_lr(4 * 4608, 10_000_000) == pytest.approx(2e-3 * (0.03**0.5))  # both factors multiply
    assert resolve_trainer(parse(TrainerConfig, {"total_training_tokens": 1_200_000}), d_sae=4608).lr == pytest.approx(
        2e-3
    )


def test_the_penalty_and_its_weight_default_by_activation():
    assert [default_sparsity_loss(a) for a in ("relu", "jumprelu", "topk", "batchtopk")] == [
        "power",
        "tanh",
        "none",
        "none",
    ]
    assert [default_l1_coefficient(p) for p in ("power", "tanh", "tanh-quad", "l0", "none")] == [
        5.0,
        0.5,
        0.5,
        0.5,
        0.5,
    ]


def test_k_aux_is_half_of_d_model_and_the_dead_threshold_a_tenth_of_the_run_up_to_10m():
    assert (default_k_aux(576), default_k_aux(17), default_k_aux(1)) == (288, 8, 1)
    assert default_dead_threshold_tokens(51_200) == 5120
    assert default_dead_threshold_tokens(10**10) == 10_000_000  # Gao et al.'s 10M for long runs
    assert default_dead_threshold_tokens(3) == 1


def test_resolve_fills_what_it_is_given_and_keeps_what_is_set():
    bare = parse(TrainerConfig, {})
    assert unresolved(bare) == [
        "trainer.sparsity_loss_type",
        "trainer.l1_coefficient",
        "trainer.lr",
        "trainer.k_aux",
        "trainer.dead_threshold_tokens",
    ]
    part = resolve_trainer(bare, activation="relu", d_sae=18432)
    assert (part.sparsity_loss_type, part.l1_coefficient, part.lr) == (
        "power",
        5.0,
        pytest.approx(default_lr(18432, 10_000_000)),
    )
    assert unresolved(part) == ["trainer.k_aux", "trainer.dead_threshold_tokens"]
    full = resolve_trainer(part, activation="topk", d_sae=64, d_model=576, run_tokens=51_200)
    assert (full.sparsity_loss_type, full.lr, full.k_aux, full.dead_threshold_tokens) == (
        "power",
        part.lr,
        288,
        5120,
    )  # set values are kept; the new arguments fill only the rest
    given = resolve_trainer(
        parse(TrainerConfig, {"lr": 3e-4, "k_aux": 7, "l1_coefficient": 0.25}),
        activation="jumprelu",
        d_sae=4608,
        d_model=64,
        run_tokens=10,
    )
    assert (given.lr, given.k_aux, given.l1_coefficient, given.sparsity_loss_type) == (3e-4, 7, 0.25, "tanh")
    with pytest.raises(ConfigError, match="lr"):
        parse(TrainerConfig, {"lr": 0.0})


def load(sae: dict, **sections) -> object:
    return experiment_from_dict({"sae": sae, **sections})


def test_loading_a_file_writes_in_the_defaults_the_file_decides():
    exp = load({"d_sae": 4 * 4608, "activation": "relu"})
    assert (exp.trainer.lr, exp.trainer.sparsity_loss_type, exp.trainer.l1_coefficient) == (
        pytest.approx(2e-3 * 0.03**0.5),
        "power",
        5.0,
    )  # 4 × 4608 latents, 10M tokens
    assert exp.trainer.k_aux is None and exp.trainer.dead_threshold_tokens is None  # they wait for the stream
    assert exp.dictionary.sparsity_include_decoder_norm is True  # relu: the penalty × ‖W_dec‖
    assert load({"d_sae": 64, "activation": "topk"}).dictionary.sparsity_include_decoder_norm is False
    # d_sae from expansion_factor × d_model: the lr waits for d_model
    assert load({"expansion_factor": 8, "activation": "jumprelu"}).trainer.lr is None
    # a CLT's d_sae counts one layer: the lr follows all n_layers × d_sae latents
    clt = load({"kind": "clt", "d_sae": 4608, "hook_points_in": ["a", "b"], "hook_points_out": ["c", "d"]})
    assert (
        clt.trainer.lr
        == pytest.approx(default_lr(2 * 4608, 10_000_000))
        == pytest.approx(4e-3 / math.sqrt(2) * math.sqrt(0.03))
    )
    # a MOLT's size is Σ rank_counts
    molt = load({"kind": "molt", "rank_counts": {"4": 9000, "16": 216}, "hook_point_in": "a", "hook_point_out": "b"})
    assert molt.trainer.lr == pytest.approx(default_lr(9216, 10_000_000))


def test_a_member_trains_with_the_defaults_of_its_dictionary():
    d = build_dictionary(parse(DictionaryConfig, {"d_sae": 4 * 4608, "k": 4, "activation": "topk"}), 16, ["x"])
    cfg = parse(TrainerConfig, {"lr_scheduler": "constant", "n_checkpoints": 0, "checkpoint_every_seconds": 0})
    m = Member(d, cfg, total_steps=10, batch_tokens=8)
    assert [g["lr"] for g in m.optimizer.param_groups] == pytest.approx(
        [default_lr(4 * 4608, 10_000_000)] * len(m.optimizer.param_groups)
    )
    assert (m.cfg.k_aux, m.k_aux, m.cfg.dead_threshold_tokens, m.schedule.dead_threshold_tokens) == (8, 8, 8, 8)
    assert unresolved(m.cfg) == []


def test_the_init_defaults_follow_their_rules():
    """SAE: encoder tied to the decoder, rows at norm 1/√3; transcoder: ungated, untied, zero decoder
    (the measurements: saecli/dictionaries/init.py and bench_quality.py)."""
    from saecli.config.init import InitConfig
    from saecli.dictionaries import init as I

    assert I.TIED_ENCODER_ROW_NORM == pytest.approx(3**-0.5)
    sae = build_dictionary(parse(DictionaryConfig, {"d_sae": 64, "k": 4}), 16, ["x"])
    tc = build_dictionary(parse(DictionaryConfig, {"kind": "transcoder", "d_sae": 64, "k": 4}), 16, ["a", "b"])
    assert (I._tied(sae, InitConfig()), I._decoder_row_norm(sae, InitConfig())) == (True, None)
    assert (I._tied(tc, InitConfig()), I._decoder_row_norm(tc, InitConfig())) == (False, 0.0)
    assert not sae.gated and not tc.gated
    assert parse(TrainerConfig, {}).auxk_coefficient == pytest.approx(1 / 32)


def test_a_top_k_sae_ranks_by_pre_activation_and_a_penalised_one_weights_by_decoder_norm():
    """sparsity_include_decoder_norm, left out: off for topk/batchtopk (dead 0.9 → 0.2 % at 1M tokens),
    on for relu/jumprelu (the penalty × ‖W_dec‖); a value the file sets is kept; other kinds keep theirs."""

    def built(**table):
        return build_dictionary(parse(DictionaryConfig, {"d_sae": 64, **table}), 16, ["x", "y"])

    assert [
        built(activation=a).cfg.sparsity_include_decoder_norm for a in ("topk", "batchtopk", "relu", "jumprelu")
    ] == [
        False,
        False,
        True,
        True,
    ]
    assert not built(activation="topk").gated and built(activation="jumprelu").gated
    assert built(activation="topk", sparsity_include_decoder_norm=True).gated
    assert built(kind="crosscoder", hook_points=["x", "y"]).cfg.sparsity_include_decoder_norm is True
    assert built(kind="transcoder").cfg.sparsity_include_decoder_norm is False
    # the parsed table leaves it open; the dictionary built from it (and config.toml) holds the value
    assert parse(DictionaryConfig, {"d_sae": 64}).sparsity_include_decoder_norm is None


# ------------------------------------------------------------------------------------------ run folders
TRAINER = {
    "total_training_tokens": 128 * 60,
    "log_frequency": 7,
    "n_checkpoints": 3,
    "checkpoint_every_seconds": 0,
    "initial_k": 12,
    "k_warmup_steps": 0.3,
    "auxk_coefficient": 0.1,
}
RESOLVED = ("lr", "sparsity_loss_type", "l1_coefficient", "k_aux", "dead_threshold_tokens")


def experiment(folder, **sae):
    return experiment_from_dict(
        {
            "run": {"output_dir": str(folder), "name": "syn"},
            "dictionary": {"expansion_factor": 4, "k": 3, "activation": "topk", **sae},
            "trainer": TRAINER,
            "store": {"backend": "none"},
        }
    )


def stream() -> SyntheticStream:
    return SyntheticStream(d_model=16, n_atoms=32, k=3, batch_size=128)


def test_config_toml_holds_the_numbers_the_run_used_and_an_old_folder_resumes_the_same(tmp_path):
    ref = train(experiment(tmp_path / "ref"), stream=stream()).folder
    written = read_toml(ref / "config.toml")
    # 60 steps × 128 tokens; d_sae = 4 × 16 = 64 latents (lr: 4e-3 below 4608), k_aux = 16 / 2
    assert {k: written["trainer"][k] for k in RESOLVED} == {
        "lr": 4e-3,
        "sparsity_loss_type": "none",
        "l1_coefficient": 0.5,
        "k_aux": 8,
        "dead_threshold_tokens": 768,
    }
    assert written["dictionary"]["d_sae"] == 64

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(experiment(cut), stream=stream(), reporter=CtrlCAt(14))
    # a folder written before these keys were recorded: none of them, and the table under its older name
    text = (cut / "config.toml").read_text().replace("[dictionary]", "[sae]")
    kept = [line for line in text.splitlines() if line.split(" = ")[0] not in (*RESOLVED, "d_sae")]
    (cut / "config.toml").write_text("\n".join(kept) + "\n")
    old = read_toml(cut / "config.toml")
    assert "k_aux" not in old["trainer"] and "d_sae" not in old["sae"] and "dictionary" not in old
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(load_experiment(cut), stream=stream(), resume=True)
    assert not [w for w in caught if "differ" in str(w.message)]  # the keys it lacks resolve as they did
    assert_same_weights(ref, cut)
    assert read_toml(cut / "config.toml")["trainer"] == written["trainer"]  # and its config.toml says so now


def test_a_sweep_member_records_the_same_numbers_as_a_train_of_it(tmp_path):
    from saecli.config.sweep import SweepConfig
    from saecli.sweep.grid import plan_from_dict

    data = {
        "run": {"output_dir": str(tmp_path / "sweep"), "name": "syn"},
        "dictionary": {"expansion_factor": 4, "k": 3, "activation": "topk"},
        "trainer": {**TRAINER, "total_training_tokens": 128 * 20},
        "store": {"backend": "none"},
    }
    plan = plan_from_dict(data, SweepConfig(grid={"dictionary.expansion_factor": [2, 4]}))
    run_sweep(plan, stream_factory=lambda exp: stream())
    for member, d_sae in zip(plan.members, (32, 64)):
        written = read_toml(member.folder / "config.toml")
        assert written["dictionary"]["d_sae"] == d_sae
        assert {k: written["trainer"][k] for k in RESOLVED} == {
            "lr": 4e-3,
            "sparsity_loss_type": "none",
            "l1_coefficient": 0.5,
            "k_aux": 8,
            "dead_threshold_tokens": 256,
        }
    alone = train(
        experiment_from_dict(
            {
                **data,
                "run": {"output_dir": str(tmp_path / "alone")},
                "dictionary": {**data["dictionary"], "expansion_factor": 2},
            }
        ),
        stream=stream(),
    ).folder
    assert read_toml(alone / "config.toml")["trainer"] == read_toml(plan.members[0].folder / "config.toml")["trainer"]
