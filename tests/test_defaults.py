"""The trainer's defaults, each pinned to its formula (the measurements behind them: bench_quality.py)."""

from __future__ import annotations

import pytest

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.config.trainer import TrainerConfig
from saecli.dictionaries.registry import build_dictionary
from saecli.errors import ConfigError
from saecli.training import Member
from saecli.training.member import default_lr, resolved_lr


def test_default_lr_is_4e3_at_d_sae_4608_and_falls_as_one_over_root_d_sae_above():
    assert default_lr(4608) == pytest.approx(4e-3)
    assert default_lr(4 * 4608) == pytest.approx(2e-3)  # 4× the latents: half the lr
    assert default_lr(2**16) == pytest.approx(4e-3 * (4608 / 2**16) ** 0.5)  # ≈ 1.06e-3
    assert default_lr(64) == pytest.approx(4e-3)  # never above the measured best


def test_an_explicit_lr_wins_and_none_means_the_default():
    assert resolved_lr(parse(TrainerConfig, {"lr": 3e-4}), 4608) == 3e-4
    assert resolved_lr(parse(TrainerConfig, {}), 18432) == pytest.approx(2e-3)
    with pytest.raises(ConfigError, match="lr"):
        parse(TrainerConfig, {"lr": 0.0})


def test_a_member_trains_with_the_default_lr_of_its_dictionary():
    d = build_dictionary(parse(DictionaryConfig, {"d_sae": 4 * 4608, "k": 4, "activation": "topk"}), 16, ["x"])
    cfg = parse(TrainerConfig, {"lr_scheduler": "constant", "n_checkpoints": 0, "checkpoint_every_seconds": 0})
    m = Member(d, cfg, total_steps=10, batch_tokens=8)
    assert [g["lr"] for g in m.optimizer.param_groups] == pytest.approx([2e-3] * len(m.optimizer.param_groups))


def test_the_init_defaults_follow_their_rules():
    """SAE: encoder tied to the decoder, rows at norm 1/√3; transcoder: ungated, untied, zero decoder
    (the measurements: saecli/dictionaries/init.py and bench_quality.py)."""
    from saecli.config.init import InitConfig
    from saecli.dictionaries import init as I

    assert I.TIED_ENCODER_ROW_NORM == pytest.approx(3 ** -0.5)
    sae = build_dictionary(parse(DictionaryConfig, {"d_sae": 64, "k": 4}), 16, ["x"])
    tc = build_dictionary(parse(DictionaryConfig, {"kind": "transcoder", "d_sae": 64, "k": 4}), 16, ["a", "b"])
    assert (I._tied(sae, InitConfig()), I._decoder_row_norm(sae, InitConfig())) == (True, None)
    assert (I._tied(tc, InitConfig()), I._decoder_row_norm(tc, InitConfig())) == (False, 0.0)
    assert sae.gated and not tc.gated
    assert parse(TrainerConfig, {}).auxk_coefficient == pytest.approx(1 / 32)
