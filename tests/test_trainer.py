"""The training loop on the synthetic stream: it learns, it recovers a known dictionary, it logs the right
numbers, several members share one stream exactly, and a diverging member stops cleanly."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.config.experiment import Experiment
from saecli.config.init import InitConfig
from saecli.config.trainer import TrainerConfig
from saecli.data.synthetic import SyntheticStream
from saecli.dictionaries.base import Dictionary, LossOutput
from saecli.dictionaries.registry import build_dictionary
from saecli.errors import RunError, UsageError
from saecli.runs import train
from saecli.training import Member, fit, initialize
from saecli.training.checkpoint import latest_checkpoint, list_checkpoints
from saecli.training.logger import read_metrics
from saecli.training.stats import FeatureStats, firing_counts

HOOK = "synthetic.0"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread is faster


def sae(d_model: int = 16, **kw) -> Dictionary:
    cfg = parse(DictionaryConfig, {"d_sae": 64, "k": 3, "activation": "topk", **kw})
    return build_dictionary(cfg, d_model, [HOOK])


def trainer_cfg(**kw) -> TrainerConfig:
    return parse(
        TrainerConfig,
        {
            "total_training_tokens": 128 * 100,
            "lr": 5e-3,
            "log_frequency": 20,
            "n_checkpoints": 0,
            "checkpoint_every_seconds": 0,
            **kw,
        },
    )


def experiment(tmp_path, **sections) -> Experiment:
    data = {
        "run": {"output_dir": str(tmp_path / "run"), "name": "syn"},
        "sae": {"d_sae": 64, "k": 3, "activation": "topk"},
        "trainer": {
            "total_training_tokens": 128 * 100,
            "lr": 5e-3,
            "log_frequency": 20,
            "n_checkpoints": 4,
            "checkpoint_every_seconds": 0,
        },
        "store": {"backend": "none"},
    }
    for name, table in sections.items():
        data[name] = {**data.get(name, {}), **table}
    return parse(Experiment, data)


def stream(**kw) -> SyntheticStream:
    return SyntheticStream(**{"d_model": 16, "n_atoms": 32, "k": 3, "batch_size": 128, **kw})


# ------------------------------------------------------------------------------------------ learning
def test_topk_sae_recovers_the_true_dictionary():
    torch.manual_seed(0)
    s = stream(batch_size=256)
    d = sae()
    before = (s.true_dictionary @ (d.W_dec / d.W_dec.norm(dim=1, keepdim=True)).T).max(dim=1).values
    tokens = initialize(s, [(d, InitConfig())])
    m = Member(
        d, trainer_cfg(total_training_tokens=256 * 300, lr=1e-2, log_frequency=50), total_steps=300, batch_tokens=tokens
    )
    fit(s, [m])
    assert m.status == "finished" and m.step == 300 and m.tokens == 300 * 256
    w = d.W_dec.detach() / d.W_dec.detach().norm(dim=1, keepdim=True)
    cos = (s.true_dictionary @ w.T).max(dim=1).values  # best decoder row for each true atom
    assert (before > 0.9).float().mean() < 0.2  # a random decoder does not pass by luck
    assert (cos > 0.9).float().mean() >= 0.8, cos
    assert m.last_record["explained_variance"] > 0.85


def test_loss_goes_down_and_metrics_are_logged(tmp_path):
    torch.manual_seed(0)
    folder = train(experiment(tmp_path), stream=stream()).folder
    records = read_metrics(folder)
    assert [r["step"] for r in records] == [20, 40, 60, 80, 100]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert records[-1]["explained_variance"] > records[0]["explained_variance"]
    for key in (
        "loss",
        "loss/mse",
        "l0",
        "explained_variance",
        "mse",
        "dead",
        "almost_dead",
        "dense",
        "lr",
        "k",
        "l1_coefficient",
        "grad_norm",
        "tokens_per_s",
        "tokens",
    ):
        assert key in records[-1], key
    assert records[-1]["l0"] == pytest.approx(3.0)  # TopK with k = 3
    assert records[-1]["tokens"] == 100 * 128
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 100
    assert (folder / "sae_weights.safetensors").exists() and (folder / "cfg.json").exists()
    assert (folder / "config.toml").exists()
    assert [s for s, _ in list_checkpoints(folder)] == [75, 100]  # 4 checkpoints, the last 2 kept


# ------------------------------------------------------------------------------------------ metrics by hand
class Scaled(Dictionary):
    """x̂ = w·x with one scalar weight (latents = w·x): metrics that are easy to compute by hand."""

    kind = "test-scaled"

    def __init__(self, d_model: int, w: float):
        cfg = DictionaryConfig(d_sae=d_model, norm_activation="none", activation="relu", k=0)
        super().__init__(cfg, d_model, [HOOK], [HOOK])
        self.w = nn.Parameter(torch.tensor(float(w)))

    def encode(self, inputs, ctx=None):
        return inputs[HOOK] * self.w

    def decode_hooks(self, feature_acts, inputs=None):
        return {HOOK: feature_acts}

    def loss(self, inputs, targets, ctx, mask=None):
        f = self.encode(inputs)
        mse = (f - targets[HOOK]).pow(2).sum(-1).mean()
        return LossOutput(mse, {"mse": mse.detach()}, f, {HOOK: f}, {HOOK: targets[HOOK]})

    def fold_activation_scale(self):
        self.folded = True


def test_explained_variance_and_mse_match_a_hand_computation():
    s = stream(offset=2.0)
    d = Scaled(16, 0.5)
    cfg = trainer_cfg(lr=1e-30, lr_scheduler="constant", log_frequency=3, total_training_tokens=3 * 128)
    m = Member(d, cfg, total_steps=3, batch_tokens=128)
    fit(s, [m])
    xs = [s.make_batch(i).acts[HOOK].double() for i in range(3)]
    sse = sum(((0.5 - 1) * x).pow(2).sum() for x in xs)  # ‖0.5x − x‖²
    sst = sum((x - x.mean(0)).pow(2).sum() for x in xs)  # around each batch's mean
    rec = m.last_record
    assert rec["explained_variance"] == pytest.approx(float(1 - sse / sst), rel=1e-5)
    assert rec["mse"] == pytest.approx(float(sse / (3 * 128 * 16)), rel=1e-5)
    assert rec["loss"] == pytest.approx(float(sse / (3 * 128)), rel=1e-5)
    assert rec["l0"] == 16 and rec["dead"] == 0


def test_firing_counts_dense_sparse_and_masked():
    f = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 5.0]])
    want = torch.tensor([1, 1, 0, 3])
    assert torch.equal(firing_counts(f), want)
    assert torch.equal(firing_counts(f.to_sparse_csr()), want)
    assert torch.equal(firing_counts(f.to_sparse()), want)
    ctx = f.reshape(1, 3, 4)
    mask = torch.tensor([[True, False, True]])
    assert torch.equal(firing_counts(ctx, mask), torch.tensor([0, 1, 0, 2]))


def test_dead_statistics():
    stats = FeatureStats(3, window=2, dead_threshold_tokens=250)
    stats.update(torch.tensor([5, 0, 0]), 100)
    stats.end_step()
    assert stats.dead_mask().tolist() == [False, False, False]  # 100 tokens: nobody dead yet
    stats.update(torch.tensor([0, 1, 0]), 100)
    stats.end_step()  # window of 2 steps closes: 200 tokens, counts [5, 1, 0]
    stats.update(torch.tensor([0, 0, 0]), 100)
    assert stats.dead_mask().tolist() == [False, False, True]  # latent 2: 300 tokens without firing
    assert stats.since_fired.tolist() == [200, 100, 300]
    assert stats.summary(dead_threshold=0.01, dense_threshold=0.02) == {
        "dead": 1,
        "almost_dead": 2,
        "dense": 1,
        "auxk_dead": 1,
    }  # freq [0.025, 0.005, 0]
    again = FeatureStats(3, window=2, dead_threshold_tokens=250)
    again.load_state_dict(stats.state_dict())
    assert torch.equal(again.since_fired, stats.since_fired) and again.summary(0.01, 0.02) == stats.summary(0.01, 0.02)


# ------------------------------------------------------------------------------------------ init
def test_dataset_norm_is_estimated_or_taken_from_the_stream():
    s = stream(scale=3.0)
    d = sae()
    initialize(s, [(d, InitConfig(init_batches=2))])
    xs = torch.cat([s.make_batch(i).acts[HOOK] for i in range(2)])
    assert float(d.scale(HOOK)) == pytest.approx(16**0.5 / float(xs.norm(dim=-1).mean()), rel=1e-5)
    assert s.position == 0  # rewound: training sees the init batches too
    known = stream(mean_norms={HOOK: 8.0})
    d2 = sae()
    initialize(known, [(d2, InitConfig())])
    assert float(d2.scale(HOOK)) == pytest.approx(4.0 / 8.0)


# ------------------------------------------------------------------------------------------ many members
def _members(n_steps: int, lrs: list[float], seed: int = 0) -> tuple[SyntheticStream, list[Member]]:
    s = stream()
    members = []
    for lr in lrs:
        torch.manual_seed(seed)
        d = sae()
        tokens = initialize(s, [(d, InitConfig())])
        members.append(
            Member(
                d,
                trainer_cfg(lr=lr, total_training_tokens=128 * n_steps),
                total_steps=n_steps,
                batch_tokens=tokens,
                name=f"lr{lr}",
            )
        )
    return s, members


def test_members_sharing_a_stream_train_exactly_like_separate_runs():
    s, together = _members(30, [1e-3, 1e-2])
    fit(s, together)
    for i, lr in enumerate([1e-3, 1e-2]):
        s_alone, (alone,) = _members(30, [lr])
        fit(s_alone, [alone])
        for (name, a), b in zip(alone.dictionary.state_dict().items(), together[i].dictionary.state_dict().values()):
            assert torch.equal(a, b), name


def test_a_diverging_member_stops_and_the_others_go_on():
    s, members = _members(40, [5e-3, 1e30])
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        fit(s, members)
    good, bad = members
    assert good.status == "finished" and good.step == 40
    assert bad.status == "diverged" and bad.step < 40
    assert "lr1e+30" in bad.message and "NaN/inf" in bad.message


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    exp = experiment(tmp_path)
    with pytest.raises(RunError, match="NaN/inf at step 61"):
        train(exp, stream=stream(nan_batches=[60]))
    folder = tmp_path / "run"
    step, path = latest_checkpoint(folder)
    assert step == 50  # checkpoints at 25, 50; the one at 75 was refused (NaN weights)
    weights = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(path / "weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (folder / "sae_weights.safetensors").exists() and not (folder / "summary.json").exists()
    assert json.loads((folder / "diverged.json").read_text())["step"] == 61


# ------------------------------------------------------------------------------------------ accumulation
def test_gradient_accumulation_steps_every_n_batches(tmp_path):
    exp = experiment(
        tmp_path,
        trainer={
            "gradient_accumulation_steps": 2,
            "total_training_tokens": 128 * 40,
            "log_frequency": 5,
            "n_checkpoints": 2,
        },
    )
    s = stream()
    folder = train(exp, stream=s).folder
    records = read_metrics(folder)
    assert [r["step"] for r in records] == [5, 10, 15, 20]  # 40 batches → 20 optimizer steps
    assert records[-1]["tokens"] == 40 * 128
    assert s.position == 40
    assert [st for st, _ in list_checkpoints(folder)] == [10, 20]


def test_grad_clipping_bounds_the_update():
    torch.manual_seed(0)
    s = stream()
    d = Scaled(16, 0.0)
    m = Member(
        d,
        trainer_cfg(
            lr=1.0,
            lr_scheduler="constant",
            clip_grad_norm=1e-3,
            optimizer_foreach=False,
            log_frequency=1,
            total_training_tokens=128,
        ),
        total_steps=1,
        batch_tokens=128,
    )
    fit(s, [m])
    assert m.last_record["grad_norm"] > 1  # logged before clipping
    assert abs(float(d.w.detach())) == pytest.approx(1.0, rel=1e-3)  # Adam's first step is ±lr whatever the scale


# ------------------------------------------------------------------------------------------ run folder
def test_an_existing_run_needs_resume_or_overwrite(tmp_path):
    exp = experiment(tmp_path, trainer={"total_training_tokens": 128 * 10, "n_checkpoints": 1})
    folder = train(exp, stream=stream()).folder
    with pytest.raises(UsageError, match="--resume"):
        train(exp, stream=stream())
    again = train(exp, stream=stream(), resume=True)  # finished: nothing to do, the summary read back
    assert again.folder == folder and again.summary == json.loads((folder / "summary.json").read_text())
    first = (folder / "sae_weights.safetensors").read_bytes()
    train(exp, stream=stream(), overwrite=True)
    assert (folder / "sae_weights.safetensors").read_bytes() == first  # same seed, same result


def test_a_finished_run_is_recorded_in_the_store(tmp_path):
    from saecli.store import open_store

    exp = experiment(
        tmp_path,
        store={"backend": "sqlite", "path": str(tmp_path / "results.db")},
        trainer={"total_training_tokens": 128 * 10},
    )
    folder = train(exp, stream=stream()).folder
    store = open_store(exp.store)
    try:
        record = store.get_sae("syn")
    finally:
        store.close()
    assert record["path"] == str(folder.resolve())
    assert record["metrics"]["step"] == 10 and record["metrics"]["status"] == "finished"


def test_bfloat16_autocast_trains(tmp_path):
    exp = experiment(
        tmp_path, trainer={"amp_dtype": "bfloat16", "total_training_tokens": 128 * 40, "log_frequency": 10}
    )
    records = read_metrics(train(exp, stream=stream()).folder)
    assert records[-1]["loss"] < records[0]["loss"]


# ------------------------------------------------------------------------------------------ data parallel
DP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.config.init import InitConfig
from saecli.config.trainer import TrainerConfig
from saecli.data.synthetic import SyntheticStream
from saecli.dictionaries.registry import build_dictionary
from saecli.training import Member, fit, initialize, plan_steps
from saecli.training.distributed import default_sync, shutdown

out = sys.argv[1]
sync = default_sync()  # starts the gloo process group that torchrun describes
torch.manual_seed(0)
d = build_dictionary(parse(DictionaryConfig, {"d_sae": 64, "k": 3}), 16, ["synthetic.0"])
s = SyntheticStream(d_model=16, n_atoms=32, k=3, batch_size=128, rank=sync.rank, world_size=sync.world_size)
tokens = initialize(s, [(d, InitConfig())], sync=sync)
cfg = parse(TrainerConfig, {"total_training_tokens": 2 * 128 * 20, "lr": 5e-3, "log_frequency": 5,
                            "n_checkpoints": 1, "checkpoint_every_seconds": 0})
plan = plan_steps(cfg.total_training_tokens, tokens, 1, sync.world_size)
m = Member(d, cfg, total_steps=plan.total_steps, batch_tokens=tokens, folder=out, sync=sync)
fit(s, [m], sync=sync)
m.close()
torch.save({"world_size": sync.world_size, "state": d.state_dict()}, f"{out}/rank{sync.rank}.pt")
shutdown()  # every rank leaves the process group together (else a peer may abort at exit)
"""


def test_two_processes_train_one_dictionary_on_disjoint_batches(tmp_path):
    """torchrun with 2 CPU ranks (gloo): gradients averaged, one writer, each rank's stream in the checkpoint."""
    import subprocess
    import sys

    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]  # really two processes
    for key, value in ranks[0]["state"].items():  # averaged gradients keep the ranks identical
        assert torch.equal(value, ranks[1]["state"][key]), key
    records = read_metrics(out)
    assert records[-1]["step"] == 20 and records[-1]["tokens"] == 2 * 128 * 20  # both ranks' tokens
    state = torch.load(out / "checkpoints" / "step_00000020" / "trainer.pt", weights_only=False)
    assert [s["rank"] for s in state["stream"]] == [0, 1] and all(s["position"] == 20 for s in state["stream"])


@pytest.mark.parametrize(
    "activation, penalty, expected",
    [
        ("relu", None, 5.0),  # L1 × decoder norm: Anthropic's April update (λ ≈ 5 with E‖x‖ = √d)
        ("jumprelu", None, 0.5),  # tanh
        ("jumprelu", "l0", 0.5),
        ("relu", "tanh-quad", 0.5),
    ],
)
def test_the_sparsity_weight_defaults_by_penalty(activation, penalty, expected):
    """A small weight such as 8e-5 is no penalty at all in these units (SmolLM2 layer 12: L0 ≈ 860 of 4608)."""
    d = build_dictionary(parse(DictionaryConfig, {"d_sae": 32, "activation": activation}), 16, ["synthetic.0"])
    extra = {"sparsity_loss_type": penalty} if penalty else {}
    m = Member(d, trainer_cfg(**extra), total_steps=10, batch_tokens=64)
    assert m.schedule.l1_coefficient == expected
    given = Member(d, trainer_cfg(l1_coefficient=0.25, **extra), total_steps=10, batch_tokens=64)
    assert given.schedule.l1_coefficient == 0.25
