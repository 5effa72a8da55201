"""Tensor-parallel dictionaries on two CPU ranks (gloo, torch.multiprocessing spawn): latents split over
a ("dp", "tp") mesh train exactly like the unsharded dictionary, hold half the bytes, and their DCP
checkpoints resume across a change of tensor-parallel size in both directions.

The workers are in tests/tp_workers.py; each spawn costs ~10 s of interpreter start-up, so one spawn
trains every case and the tests read its results. The reference runs in this process, without any
process group: today's Member, its default (sparse-kernel) paths.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import tp_workers as W

from saecli.dictionaries.molt import Layout
from saecli.errors import ConfigError
from saecli.training.checkpoint import latest_checkpoint, list_checkpoints
from saecli.training.member import Member
from saecli.training.tensor_parallel import check_tensor_parallel

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Every case trained 50 steps on tp = 2 (world 2), and the dp = 2 mesh vs TorchSync."""
    out = tmp_path_factory.mktemp("tp")
    W.spawn(W.sharded_runs, 2, out, 2)
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}


@pytest.mark.parametrize("case", list(W.CASES))
def test_sharded_run_equals_unsharded(sharded, case):
    got = torch.load(sharded / f"{case}.pt", weights_only=False)
    assert got["world"] == 2 and got["mesh"] == (1, 2)  # really two processes, latents split in two
    ref = W.reference(case)
    diffs = _max_diff(ref["state"], got["state"])
    assert max(diffs.values()) <= 1e-5, diffs
    assert len(got["fired"]) == len(ref["fired"]) == W.STEPS
    for step, (a, b) in enumerate(zip(ref["fired"], got["fired"], strict=True)):
        assert torch.equal(a, b), f"step {step}: active latents differ"
    if W.CASES[case]["activation"] in ("topk", "batchtopk"):
        assert sum(v > 0 for v in ref["aux"]) >= 10  # AuxK really ran on dead latents
        assert got["aux"] == pytest.approx(ref["aux"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("case", ["topk", "jumprelu", "transcoder", "crosscoder", "clt", "molt"])
def test_each_rank_holds_half_the_latent_state(sharded, case):
    """Parameter + Adam bytes of one rank = half of the latent tensors + all of the replicated ones.
    The MOLT: W_E 64×16 + b_E 64 + V, U 128×16 each (5184 floats) split, b_D 16 replicated: 62400 bytes
    with Adam's two moments unsharded, 62400 − 62208/2 = 31296 per rank."""
    got = torch.load(sharded / f"{case}.pt", weights_only=False)
    ref = W.reference(case, steps=1)
    d = W.dictionary(case)
    axes = type(d).latent_axes
    # Adam keeps two moments per parameter: 3 copies of each tensor
    latent = 3 * sum(p.numel() * p.element_size() for n, p in d.named_parameters() if n in axes)
    assert ref["bytes"] == 3 * sum(p.numel() * p.element_size() for p in d.parameters())
    assert got["bytes"] == ref["bytes"] - latent // 2
    assert got["bytes"] / ref["bytes"] < 0.56  # 0.50 of the latent tensors; b_dec (and W_skip) replicated
    if case == "molt":
        assert (ref["bytes"], got["bytes"]) == (62400, 31296)


def test_dp_mesh_equals_todays_data_parallel(sharded):
    got = torch.load(sharded / "dp.pt", weights_only=False)
    assert got["mesh"] == (2, 1)
    diffs = _max_diff(got["today"], got["sharded"])
    assert max(diffs.values()) <= 1e-6, diffs


def test_2d_mesh_dp2_tp2_equals_data_parallel(sharded):
    """4 processes, mesh (dp 2, tp 2): the same weights as today's data parallel on 2 processes (same
    batches per dp rank), so the two axes compose."""
    W.spawn(W.two_d_runs, 4, sharded)
    got = torch.load(sharded / "2d.pt", weights_only=False)
    assert got["mesh"] == (2, 2) and got["dp"] == (0, 2)
    today = torch.load(sharded / "dp.pt", weights_only=False)["today"]
    diffs = _max_diff(today, got["state"])
    assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.parametrize("case", ["topk", "molt"])
def test_resume_across_tensor_parallel_sizes(tmp_path, case):
    """1 → 2: an unsharded checkpoint at step 25 resumed on tp = 2; 2 → 1: a tp = 2 DCP checkpoint at step
    25 resumed in one process without a process group. Both end where the uninterrupted run ends (a MOLT's
    checkpoint holds its transforms in the split order: reordered on the way in and out)."""
    m = Member(
        W.dictionary(case), W.trainer_cfg(), total_steps=W.STEPS, batch_tokens=W.N_TOK, folder=tmp_path / "plain"
    )
    W.train(m, case, 0, W.STEPS // 2)
    m.save_checkpoint({"stream": [None], "rng": None, "batches_seen": W.STEPS // 2})
    W.spawn(W.resume_runs, 2, tmp_path, 2, case)
    ref = W.reference(case)
    for name in ("one_to_two", "two_to_two"):
        got = torch.load(tmp_path / f"{name}.pt", weights_only=False)
        assert got["step_resumed"] == W.STEPS // 2
        assert max(_max_diff(ref["state"], got["state"]).values()) <= 1e-5, name
    step, path = latest_checkpoint(tmp_path / "sharded")
    assert step == W.STEPS // 2 and (path / "dcp" / ".metadata").exists()
    assert len(list((path / "dcp").glob("*.distcp"))) == 2  # one shard file per rank
    m2, _ = Member.from_checkpoint(W.dictionary(case), W.trainer_cfg(), path)
    assert m2.step == W.STEPS // 2 and m2.optimizer.state  # Adam moments came back too
    W.train(m2, case, m2.step, W.STEPS)
    assert max(_max_diff(ref["state"], W.full_state(m2.dictionary)).values()) <= 1e-5


def test_covered_kinds_are_the_ones_declaring_latent_axes():
    from saecli.training.tensor_parallel import covered_kinds

    assert covered_kinds() == ["sae", "transcoder", "crosscoder", "clt", "molt"]  # lorsa: not split


def test_config_errors_name_the_key():
    from saecli.training.tensor_parallel import check_run

    for args, words in [
        (("lorsa", {}, 64, 2, 2), "kind 'lorsa' cannot be split"),
        (("sae", {"W_enc": 0}, 64, 3, 4), "divide the 4"),
        (("sae", {"W_enc": 0}, 64, 3, 3), "d_sae = 64"),
        (("sae", {"W_enc": 0}, 64, 0, 2), ">= 1"),
    ]:
        with pytest.raises(ConfigError, match=words) as err:
            check_tensor_parallel(*args)
        assert err.value.key == "trainer.tensor_parallel"
    with pytest.raises(ConfigError, match="needs at least 2 processes") as err:  # a plain `saecli train`
        check_run("sae", 64, 2)
    assert err.value.key == "trainer.tensor_parallel"
    check_run("lorsa", 64, 1)  # tp = 1: every kind


def test_molt_split_order_by_hand():
    """rank_counts {1: 4, 3: 2}: transforms 0-3 of rank 1 (rows 0-3), 4-5 of rank 3 (rows 4-6, 7-9). The
    split order deals gcd(4, 2) = 2 units of 2 + 1 transforms: [0, 1, 4 | 2, 3, 5], so with tp = 2 rank 0
    holds transforms 0, 1, 4 and rows 0, 1, 4, 5, 6 (5 of the 10), rank 1 the rest."""
    d = _molt({"1": 4, "3": 2})
    order = d.latent_order()
    assert order["W_E"].tolist() == [0, 1, 4, 2, 3, 5]
    assert order["V"].tolist() == order["U"].tolist() == [0, 1, 4, 5, 6, 2, 3, 7, 8, 9]
    # a rank's slice is one unit, its own layout: ranks [1, 1, 3], rows of transform 2 start at 2
    half = Layout.of([(1, 2), (3, 1)], units=1)
    assert half.rank_of.tolist() == [1, 1, 3] and half.row_start.tolist() == [0, 1, 2]
    assert half.owner.tolist() == [0, 1, 2, 2, 2]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_molt_split_order_gives_every_tp_whole_transforms(tp):
    """One split order for every tp (so DCP reshards 2 → 4 like the other kinds): its contiguous tp parts
    hold count/tp transforms of each rank group, and the rows of V/U split the same way are exactly those
    transforms' rows, in the rank's own layout (`Layout` of its units)."""
    d = _molt({"1": 8, "2": 4, "4": 4})  # 16 transforms, R = 8 + 8 + 16 = 32 rows; 4 units of 2 + 1 + 1
    order, rows = d.latent_order()["W_E"], d.latent_order()["V"]
    for part, row_part in zip(order.chunk(tp), rows.chunk(tp), strict=True):
        assert torch.bincount(d.rank_of[part], minlength=5).tolist() == [0, 8 // tp, 4 // tp, 0, 4 // tp]
        mine = torch.cat([torch.arange(int(d.row_start[i]), int(d.row_start[i] + d.rank_of[i])) for i in part])
        assert torch.equal(row_part, mine)
        assert torch.equal(d.rank_of[part], Layout.of([(1, 2), (2, 1), (4, 1)], units=4 // tp).rank_of)


def test_molt_counts_not_divisible_by_tp_is_a_config_error():
    from saecli.dictionaries.molt import MixtureOfLinearTransforms
    from saecli.training.tensor_parallel import check_run

    d = _molt({"1": 4, "3": 2})
    MixtureOfLinearTransforms.check_split(d.cfg, 2)  # 4 and 2 split in two
    with pytest.raises(ConfigError, match="must divide every count of dictionary.rank_counts") as err:
        MixtureOfLinearTransforms.check_split(d.cfg, 4)  # 2 transforms of rank 3 cannot go to 4 ranks
    assert err.value.key == "dictionary.rank_counts"
    with pytest.raises(ConfigError, match="needs at least 4 processes"):  # the process count comes first
        check_run("molt", 6, 4, d.cfg)


def _molt(rank_counts: dict[str, int]):
    from saecli.config.base import parse
    from saecli.config.dictionary import DictionaryConfig
    from saecli.dictionaries.registry import build_dictionary

    cfg = parse(
        DictionaryConfig, {"kind": "molt", "k": 2, "rank_counts": rank_counts, "hook_point_in": W.HIN}, key="sae"
    )
    return build_dictionary(cfg, W.D_MODEL, [W.HIN, W.HOUT])


def test_accelerate_train_with_tensor_parallel_then_resume_in_one_process(tiny_llama, tmp_path):
    """`saecli train` on 2 ranks with trainer.tensor_parallel = 2: the mesh line, DCP checkpoints, an
    unsharded sae_weights.safetensors; then the step-20 checkpoint resumed in one process (tp = 1) ends
    where the sharded run ended."""
    from safetensors.torch import load_file
    from test_distributed import accelerate, tiny_experiment

    from saecli.config.load import load_experiment
    from saecli.runs import train
    from saecli.training.logger import read_metrics

    toml = tiny_experiment(tmp_path / "exp.toml", tiny_llama, tmp_path / "tp")
    proc = accelerate("train", toml, "--set", "trainer.tensor_parallel=2")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert log.count("world size 2 (1 machine × 2 processes) · mesh dp=1 × tp=2 · per rank 256 tokens per step") == 1
    out = tmp_path / "tp"
    (s20, _), (s40, p40) = list_checkpoints(out)
    assert (s20, s40) == (20, 40)  # dp = 1: 10240 tokens / 256 per step
    assert (p40 / "dcp" / ".metadata").exists() and len(list((p40 / "dcp").glob("*.distcp"))) == 2
    sharded = load_file(str(out / "sae_weights.safetensors"))
    assert sharded["W_enc"].shape == (128, 64) and sharded["W_dec"].shape == (128, 64)  # gathered whole
    assert [r["step"] for r in read_metrics(out)][-1] == 40
    # back to step 20, resumed by one process without tensor parallelism
    import shutil

    shutil.rmtree(p40)
    for name in ("summary.json", "sae_weights.safetensors"):
        (out / name).unlink()
    exp = load_experiment(toml, ["trainer.tensor_parallel=1"])
    result = train(exp, resume=True)
    assert result.summary["step"] == 40
    single = load_file(str(out / "sae_weights.safetensors"))
    for key in sharded:
        assert torch.allclose(single[key], sharded[key], rtol=0, atol=1e-5), key


def test_sweep_with_tensor_parallel_is_a_config_error(tiny_llama, tmp_path):
    """A sweep spreads whole members over the ranks (one stream per group, shared by its members); a member
    split over tp ranks would need all of them: refused before any work, naming the key."""
    from test_distributed import tiny_experiment

    from saecli.runs.sweep import run_sweep
    from saecli.sweep.grid import load_sweep

    toml = tiny_experiment(
        tmp_path / "sweep.toml",
        tiny_llama,
        tmp_path / "sw",
        extra="""
        [sweep]
        grid = {"trainer.lr" = [2e-3, 8e-3]}
    """,
    )
    plan = load_sweep(toml, ["trainer.tensor_parallel=2"])
    with pytest.raises(ConfigError, match="a sweep trains each member on one process") as err:
        run_sweep(plan)
    assert err.value.key == "trainer.tensor_parallel"
    assert not (tmp_path / "sw").exists()  # nothing written
