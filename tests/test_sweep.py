"""Training a sweep: members reach the weights of separate `train` runs, mixed kinds and shapes train
side by side on the same batches, a NaN member stops alone, per-member outputs and checkpoints are the
normal ones, and a killed sweep resumes (finished members skipped) to the uninterrupted result."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saecli.config.base import parse
from saecli.config.sweep import SweepConfig
from saecli.data.synthetic import SyntheticStream
from saecli.dictionaries.registry import load_dictionary
from saecli.errors import UsageError
from saecli.runs import run_sweep, train
from saecli.sweep.grid import plan_from_dict
from saecli.sweep.summary import FRONTIER_PNG, SUMMARY_JSON, pareto_front
from saecli.training.checkpoint import list_checkpoints
from saecli.training.logger import read_metrics

REPO = Path(__file__).resolve().parents[1]
TIMING = ("tokens_per_s", "elapsed_s")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread is faster


def base(out: Path, steps: int = 30, **trainer) -> dict:
    return {
        "run": {"output_dir": str(out), "name": "syn"},
        "sae": {"d_sae": 64, "k": 4, "activation": "topk"},
        "trainer": {
            "total_training_tokens": 128 * steps,
            "lr": 5e-3,
            "log_frequency": 10,
            "n_checkpoints": 3,
            "checkpoint_every_seconds": 0,
            "auxk_coefficient": 0.1,
            "dead_threshold_tokens": 256,
            "l1_coefficient": 1e-2,
            **trainer,
        },
        "store": {"backend": "none"},
    }


def make_plan(out: Path, sweep: dict, steps: int = 30, **trainer):
    """A sweep on the synthetic stream."""
    return plan_from_dict(base(out, steps, **trainer), parse(SweepConfig, sweep, key="sweep"))


def stream(exp=None) -> SyntheticStream:
    return SyntheticStream(d_model=16, n_atoms=32, k=3, batch_size=128)


def alone(member, root: Path, **kw) -> Path:
    """The same member trained by `saecli train`'s function on its own stream."""
    exp = member.exp
    exp = dataclasses.replace(exp, run=dataclasses.replace(exp.run, output_dir=str(root / member.name)))
    return train(exp, stream=stream(), **kw).folder


def assert_close_weights(a: Path, b: Path, atol: float = 2e-6) -> None:
    wa, wb = load_file(str(a / "sae_weights.safetensors")), load_file(str(b / "sae_weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=atol), (k, float((wa[k] - wb[k]).abs().max()))


def assert_close_metrics(a: Path, b: Path) -> None:
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert set(x) - set(TIMING) == set(y) - set(TIMING)
        for key, value in x.items():
            if key not in TIMING:
                assert y[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------------------------------------ members
def test_a_group_trains_to_the_weights_of_separate_runs(tmp_path):
    plan = make_plan(
        tmp_path / "sweep",
        {
            "variants": [
                {"trainer.lr": 2e-3, "sae.k": 3},
                {"trainer.lr": 1e-2, "sae.k": 6, "run.seed": 1},
                {
                    "trainer.lr": 5e-3,
                    "sae.k": 4,
                    "trainer.auxk_coefficient": 0.0,
                    "trainer.lr_scheduler": "cosineannealing",
                },
            ]
        },
    )
    rows = run_sweep(plan, stream_factory=stream)
    assert [r["status"] for r in rows] == ["finished"] * 3
    for m in plan.members:
        records = read_metrics(m.folder)
        assert records[-1]["l0"] == pytest.approx(m.exp.dictionary.k)
        ref = alone(m, tmp_path / "alone")
        assert_close_weights(ref, m.folder)
        assert_close_metrics(ref, m.folder)
        loaded = load_dictionary(m.folder)  # the normal saved format
        assert loaded.kind == "sae" and loaded.d_sae == 64 and loaded.folded
        assert [s for s, _ in list_checkpoints(m.folder)] == [20, 30]
        assert (m.folder / "config.toml").exists() and "[sweep]" not in (m.folder / "config.toml").read_text()


def test_relu_jumprelu_and_other_shapes_train_side_by_side_on_the_same_batches(tmp_path):
    plan = make_plan(
        tmp_path / "sweep",
        {
            "variants": [
                {"sae.activation": "relu", "trainer.l1_coefficient": 1e-3},
                {"sae.activation": "relu", "trainer.l1_coefficient": 3e-2, "trainer.lr": 1e-2},
                {"sae.activation": "jumprelu", "trainer.l1_coefficient": 1e-3},
                {"sae.d_sae": 32},
            ]
        },
        steps=20,
    )
    rows = run_sweep(plan, stream_factory=stream)
    assert [r["status"] for r in rows] == ["finished"] * 4
    for m in plan.members:
        assert_close_weights(alone(m, tmp_path / "alone"), m.folder)


def test_a_nan_member_stops_and_the_others_go_on(tmp_path):
    plan = make_plan(tmp_path / "sweep", {"grid": {"trainer.lr": [5e-3, 1e30, 1e-2]}}, steps=40)
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        rows = run_sweep(plan, stream_factory=stream)
    assert [r["status"] for r in rows] == ["finished", "diverged", "finished"]
    bad = plan.members[1].folder
    info = json.loads((bad / "diverged.json").read_text())
    assert info["step"] < 40 and "NaN/inf" in info["message"]
    assert not (bad / "sae_weights.safetensors").exists()
    for i in (0, 2):  # untouched by their diverged neighbour
        assert_close_weights(alone(plan.members[i], tmp_path / "alone"), plan.members[i].folder)
    summary = json.loads((tmp_path / "sweep" / SUMMARY_JSON).read_text())
    assert [r["status"] for r in summary] == ["finished", "diverged", "finished"]


# ------------------------------------------------------------------------------------------ folders
def test_existing_runs_need_resume_or_overwrite_and_finished_members_are_skipped(tmp_path):
    plan = make_plan(tmp_path / "sweep", {"grid": {"sae.k": [3, 5]}}, steps=10)
    run_sweep(plan, stream_factory=stream)
    first = (plan.members[0].folder / "summary.json").stat().st_mtime_ns
    with pytest.raises(UsageError, match="--resume"):
        run_sweep(plan, stream_factory=stream)
    run_sweep(plan, stream_factory=stream, resume=True)  # nothing left to do
    assert (plan.members[0].folder / "summary.json").stat().st_mtime_ns == first
    before = load_file(str(plan.members[1].folder / "sae_weights.safetensors"))
    run_sweep(plan, stream_factory=stream, overwrite=True)
    after = load_file(str(plan.members[1].folder / "sae_weights.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # same seeds, same result


def test_a_sweep_members_checkpoint_resumes_as_a_plain_train_run(tmp_path):
    """Per-member checkpoints hold the member's own optimizer state in torch's Adam format."""
    plan = make_plan(tmp_path / "sweep", {"grid": {"trainer.lr": [2e-3, 8e-3]}}, steps=30)
    run_sweep(plan, stream_factory=stream)
    m = plan.members[1]
    final = load_file(str(m.folder / "sae_weights.safetensors"))
    for name in ("summary.json", "sae_weights.safetensors", "cfg.json"):
        (m.folder / name).unlink()
    import shutil

    shutil.rmtree(list_checkpoints(m.folder)[-1][1])  # back to step 20
    train(m.exp, stream=stream(), resume=True)
    again = load_file(str(m.folder / "sae_weights.safetensors"))
    for k in final:
        assert torch.allclose(final[k], again[k], rtol=0, atol=2e-6), k


def test_resume_from_the_latest_checkpoint_every_member_has(tmp_path):
    """A kill between two members' checkpoints leaves them at different steps: both go back to the
    latest step they share, so they can go on reading one stream."""
    plan = make_plan(tmp_path / "sweep", {"grid": {"trainer.lr": [2e-3, 8e-3]}}, steps=30)
    run_sweep(plan, stream_factory=stream)
    finals = [load_file(str(m.folder / "sae_weights.safetensors")) for m in plan.members]
    for m in plan.members:
        for name in ("summary.json", "sae_weights.safetensors", "cfg.json"):
            (m.folder / name).unlink()
    import shutil

    shutil.rmtree(list_checkpoints(plan.members[0].folder)[-1][1])  # member 0 at step 20, member 1 at 30
    run_sweep(plan, stream_factory=stream, resume=True)
    for m, final in zip(plan.members, finals):
        again = load_file(str(m.folder / "sae_weights.safetensors"))
        assert all(torch.equal(final[k], again[k]) for k in final), m.name
        assert [r["step"] for r in read_metrics(m.folder)] == [10, 20, 30]


# ------------------------------------------------------------------------------------------ summary
def test_pareto_front_by_hand():
    #            L0   EV
    points = [(8, 0.70), (16, 0.80), (16, 0.75), (32, 0.78), (4, 0.50), (64, 0.90)]
    assert pareto_front(points) == [4, 0, 1, 5]


def test_summary_table_and_frontier_plot(tmp_path):
    plan = make_plan(tmp_path / "sweep", {"grid": {"sae.k": [2, 8]}}, steps=10)
    rows = run_sweep(plan, stream_factory=stream)
    assert [r["member"] for r in rows] == ["k=2", "k=8"]
    for r in rows:
        assert r["l0"] == pytest.approx(2 if r["member"] == "k=2" else 8)
        assert 0 < r["explained_variance"] < 1 and 0 <= r["dead_pct"] <= 100 and r["loss_recovered"] is None
    png = (tmp_path / "sweep" / FRONTIER_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "sweep").iterdir() if p.name.startswith(".")]  # atomic writes left nothing


def test_wandb_offline_one_run_per_member(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    plan = plan_from_dict(
        {**base(tmp_path / "sweep", 10), "wandb": {"enabled": True, "mode": "offline", "project": "saecli-test"}},
        parse(SweepConfig, {"grid": {"trainer.lr": [1e-3, 4e-3]}}, key="sweep"),
    )
    run_sweep(plan, stream_factory=stream)
    ids = [(m.folder / "wandb_run_id.txt").read_text().strip() for m in plan.members]
    assert len(set(ids)) == 2
    for m, run_id in zip(plan.members, ids):
        assert len(list((m.folder / "wandb").glob(f"offline-run-*-{run_id}"))) == 1


# ------------------------------------------------------------------------------------------ kill + resume
SCRIPT = textwrap.dedent('''
    """Run the sweep described by a JSON file on the synthetic stream, slowed so that a kill lands mid-run."""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from saecli.config.base import parse
    from saecli.config.sweep import SweepConfig
    from saecli.data.synthetic import SyntheticStream
    from saecli.sweep.grid import plan_from_dict
    from saecli.runs import run_sweep, train

    spec, mode = json.loads(open(sys.argv[1]).read()), sys.argv[2]

    class Slow(SyntheticStream):
        def make_batch(self, index):
            time.sleep(0.01)
            return super().make_batch(index)

    plan = plan_from_dict(spec["base"], parse(SweepConfig, spec["sweep"], key="sweep"))
    run_sweep(plan, stream_factory=lambda exp: Slow(d_model=16, n_atoms=32, k=3, batch_size=128),
              resume=(mode == "resume"))
''')


def two_groups(out: Path) -> tuple[dict, dict]:
    """A short group (one member) then a long one (three members, one of another shape)."""
    sweep = {
        "name": "variant{index}",
        "variants": [
            {"trainer.total_training_tokens": 128 * 20, "sae.k": 3},
            {"trainer.lr": 2e-3},
            {"trainer.lr": 8e-3, "sae.k": 6},
            {"sae.d_sae": 48},
        ],
    }
    return base(out, steps=100, n_checkpoints=5, dead_threshold_tokens=512), sweep


def test_sigkill_then_resume_equals_the_uninterrupted_sweep(tmp_path):
    script, spec = tmp_path / "sweep_script.py", tmp_path / "spec.json"
    script.write_text(SCRIPT)
    cut = tmp_path / "cut"
    sweep_base, sweep = two_groups(cut)
    spec.write_text(json.dumps({"base": sweep_base, "sweep": sweep}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(mode: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), str(spec), mode],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    proc = start("fresh")
    short, long_ = cut / "variant0", [cut / n for n in ("variant1", "variant2", "variant3")]
    end = time.monotonic() + 240
    while not all(list_checkpoints(f) for f in long_) and time.monotonic() < end:  # group 2 under way
        if proc.poll() is not None:
            pytest.fail("the sweep ended before it could be killed: " + proc.stdout.read()[-2000:])
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (short / "summary.json").exists(), "the short group finishes first"
    assert not any((f / "summary.json").exists() for f in long_), "killed too late"
    done = (short / "summary.json").stat().st_mtime_ns
    resumed = start("resume")
    ref = tmp_path / "ref"  # meanwhile, the same sweep uninterrupted in this process
    ref_base, _ = two_groups(ref)
    run_sweep(plan_from_dict(ref_base, parse(SweepConfig, sweep, key="sweep")), stream_factory=stream)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert (short / "summary.json").stat().st_mtime_ns == done  # skipped, not trained again
    for name in ("variant0", "variant1", "variant2", "variant3"):
        assert_close_weights(ref / name, cut / name, atol=0)
        steps = [r["step"] for r in read_metrics(cut / name)]
        assert steps == [r["step"] for r in read_metrics(ref / name)] and len(steps) == len(set(steps))


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_sweep_on_a_live_model_with_eval(run_cli, tiny_llama, tmp_path):
    """`saecli sweep` end to end: one model for the group, per-member folders, eval's loss recovered in the table."""
    toml = tmp_path / "sweep.toml"
    toml.write_text(
        textwrap.dedent(f'''
        [run]
        name = "cli"
        output_dir = "{tmp_path / "runs"}"
        [model]
        name = "{tiny_llama}"
        device = "cpu"
        [activations]
        hook_points = ["blocks.1.hook_resid_post"]
        context_size = 32
        model_batch_size = 4
        batch_size = 128
        shuffle_buffer_tokens = 512
        [sae]
        d_sae = 64
        k = 4
        [trainer]
        total_training_tokens = 1280
        log_frequency = 5
        n_checkpoints = 1
        checkpoint_every_seconds = 0
        [eval]
        total_eval_tokens = 256
        ce_contexts = 2
        [store]
        backend = "none"
        [sweep]
        grid = {{"sae.k" = [2, 6]}}
        eval = true
    ''')
    )
    result = run_cli("sweep", toml)
    assert result.exit_code == 0, result.output
    assert "sweep: 2 members" in result.output and "loss rec." in result.output
    rows = json.loads((tmp_path / "runs" / SUMMARY_JSON).read_text())
    assert [r["member"] for r in rows] == ["k=2", "k=6"] and all(r["status"] == "finished" for r in rows)
    for r in rows:  # the summary carries each member's eval (on the random tiny model: undefined, with a reason)
        metrics = json.loads((tmp_path / "runs" / r["member"] / "eval.json").read_text())["metrics"]
        assert r["loss_recovered"] == metrics["loss_recovered"]
        assert isinstance(r["loss_recovered"], float) or "loss_recovered_undefined" in metrics
    assert (tmp_path / "runs" / "k=6" / "eval.json").exists() and (tmp_path / "runs" / FRONTIER_PNG).exists()
