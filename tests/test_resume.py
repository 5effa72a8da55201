"""Exact resume: a run stopped at any point (SIGKILL, Ctrl-C, a kill in the middle of writing a
checkpoint) and resumed ends with the same weights and the same metrics as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import tiny_topk_toml
from kinds_contract import CtrlCAt, assert_same_weights

from saecli.config.base import parse
from saecli.config.experiment import Experiment
from saecli.data.synthetic import SyntheticStream
from saecli.runs import train
from saecli.training.checkpoint import list_checkpoints
from saecli.training.logger import read_metrics

REPO = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
TIMING = ("tokens_per_s", "elapsed_s")  # the only metrics allowed to differ between two runs


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread is faster


def assert_same_metrics(a: Path, b: Path) -> None:
    ra, rb = read_metrics(a), read_metrics(b)
    steps = [r["step"] for r in rb]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    assert steps == [r["step"] for r in ra]
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}


def wait_for_checkpoint(proc: subprocess.Popen, folder: Path, timeout: float = 120) -> int:
    """Poll until the run has written a checkpoint (while it is still running); return its step."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = list_checkpoints(folder)
        if found:
            return found[-1][0]
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the run ended (exit {proc.returncode}) before writing a checkpoint:\n{out[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


# ------------------------------------------------------------------------------------------ in process
def experiment(folder: Path, **trainer) -> Experiment:
    return parse(
        Experiment,
        {
            "run": {"output_dir": str(folder), "name": "syn"},
            "sae": {"d_sae": 64, "k": 3, "activation": "topk"},
            "trainer": {
                "total_training_tokens": 128 * 60,
                "lr": 5e-3,
                "log_frequency": 7,
                "n_checkpoints": 3,
                "checkpoint_every_seconds": 0,
                "initial_k": 12,
                "k_warmup_steps": 0.3,
                "auxk_coefficient": 0.1,
                "dead_threshold_tokens": 512,
                "feature_sampling_window": 9,
                **trainer,
            },
            "store": {"backend": "none"},
        },
    )


def stream() -> SyntheticStream:
    return SyntheticStream(d_model=16, n_atoms=32, k=3, batch_size=128)


def test_ctrl_c_saves_a_checkpoint_and_resume_is_exact(tmp_path):
    ref = train(experiment(tmp_path / "ref"), stream=stream()).folder
    exp = experiment(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        train(exp, stream=stream(), reporter=CtrlCAt(14))
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [14]  # off the schedule (20, 40, 60)
    assert not (tmp_path / "cut" / "summary.json").exists()
    train(exp, stream=stream(), resume=True)
    assert_same_weights(ref, tmp_path / "cut")
    assert_same_metrics(ref, tmp_path / "cut")


def test_a_run_killed_while_saving_its_outputs_finishes_on_resume(tmp_path):
    ref = train(experiment(tmp_path / "ref"), stream=stream()).folder
    expected = (ref / "sae_weights.safetensors").read_bytes()
    for name in ("summary.json", "sae_weights.safetensors", "cfg.json"):  # as if killed before writing them
        (ref / name).unlink()
    train(experiment(tmp_path / "ref"), stream=stream(), resume=True)  # from the final step's checkpoint
    assert (ref / "sae_weights.safetensors").read_bytes() == expected
    assert (ref / "summary.json").exists()


def test_wandb_offline_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    exp = experiment(tmp_path / "run", total_training_tokens=128 * 20)
    exp.wandb = parse(type(exp.wandb), {"enabled": True, "mode": "offline", "project": "saecli-test"})
    with pytest.raises(KeyboardInterrupt):
        train(exp, stream=stream(), reporter=CtrlCAt(7))
    run_id = (tmp_path / "run" / "wandb_run_id.txt").read_text().strip()
    train(exp, stream=stream(), resume=True)
    assert (tmp_path / "run" / "wandb_run_id.txt").read_text().strip() == run_id
    # One offline folder per session, named by start second and run id: two sessions that start in the
    # same second share one folder, so count ids, not folders.
    sessions = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert sessions and {folder.name.rsplit("-", 1)[1] for folder in sessions} == {run_id}


# ------------------------------------------------------------------------------------------ real kills
SCRIPT = textwrap.dedent('''
    """Train on the synthetic stream (slowed a little so a kill lands mid-run)."""
    import os, signal, sys, time
    import torch
    from saecli.config.base import parse
    from saecli.config.experiment import Experiment
    from saecli.data.synthetic import SyntheticStream
    import saecli.training.checkpoint as ck
    from saecli.runs import train

    out, mode = sys.argv[1], sys.argv[2]

    class Slow(SyntheticStream):
        def make_batch(self, index):
            time.sleep(0.004)
            return super().make_batch(index)

    if mode == "kill-in-write":  # die between the weights and the state of the 2nd checkpoint
        write_state, calls = ck._write_state, []
        def dying_write_state(path, state):
            calls.append(path)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            write_state(path, state)
        ck._write_state = dying_write_state

    exp = parse(Experiment, {
        "run": {"output_dir": out, "name": "syn"},
        "sae": {"d_sae": 64, "k": 3, "activation": "topk"},
        "trainer": {"total_training_tokens": 128 * 300, "lr": 5e-3, "log_frequency": 10, "n_checkpoints": 6,
                    "checkpoint_every_seconds": 0, "auxk_coefficient": 0.1, "dead_threshold_tokens": 1024},
        "store": {"backend": "none"},
    })
    train(exp, stream=Slow(d_model=16, n_atoms=32, k=3, batch_size=128), resume=(mode == "resume"))
''')


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "run_synthetic.py"
    path.write_text(SCRIPT)
    return path


def run_script(script: Path, out: Path, mode: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), str(out), mode],
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def synthetic_reference(script, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(run_script(script, out, "fresh"))
    return out


def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(script, synthetic_reference, tmp_path):
    out = tmp_path / "run"
    proc = run_script(script, out, "fresh")
    wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    finish(run_script(script, out, "resume"))
    assert_same_weights(synthetic_reference, out)
    assert_same_metrics(synthetic_reference, out)


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one(script, synthetic_reference, tmp_path):
    out = tmp_path / "run"
    proc = run_script(script, out, "kill-in-write")
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert [s for s, _ in list_checkpoints(out)] == [50]  # the 2nd (step 100) never completed
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers and all(".tmp-" in n for n in leftovers)  # the half-written one, under its temp name
    finish(run_script(script, out, "resume"))
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # cleaned up
    assert_same_weights(synthetic_reference, out)
    assert_same_metrics(synthetic_reference, out)


# ------------------------------------------------------------------------------------------ the CLI
def tiny_toml(path: Path, model: Path, out: Path) -> Path:
    return tiny_topk_toml(
        path,
        model,
        out,
        name="tiny",
        activations="""
        model_batch_size = 8
        batch_size = 256
        shuffle_buffer_tokens = 4096
    """,
        trainer="""
        total_training_tokens = 51_200   # 200 steps
        lr = 2e-3
        log_frequency = 10
        n_checkpoints = 8
        checkpoint_every_seconds = 0
    """,
    )


def cli_popen(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "saecli", *map(str, args)],
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def cli_reference(tiny_llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-reference")
    finish(cli_popen("train", tiny_toml(root / "tiny.toml", tiny_llama, root / "run")))
    return root / "run"


def test_cli_ctrl_c_then_sigkill_then_resume_equals_the_uninterrupted_run(tiny_llama, cli_reference, tmp_path):
    toml = tiny_toml(tmp_path / "tiny.toml", tiny_llama, tmp_path / "run")
    # 1. Ctrl-C: a checkpoint is written, exit code 130
    proc = cli_popen("train", toml)
    first = wait_for_checkpoint(proc, tmp_path / "run")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out
    interrupted_at = list_checkpoints(tmp_path / "run")[-1][0]
    assert interrupted_at >= first  # the Ctrl-C checkpoint (unless it fell on the scheduled step)
    # 2. resume from the run folder (its config.toml), then SIGKILL after its next checkpoint
    proc = cli_popen("train", tmp_path / "run", "--resume")
    end = time.monotonic() + 120
    while list_checkpoints(tmp_path / "run")[-1][0] == interrupted_at and time.monotonic() < end:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "summary.json").exists(), "the run finished before it could be killed"
    # 3. resume again: the same weights and metrics as a run that was never stopped
    finish(cli_popen("train", toml, "--resume"))
    assert_same_weights(cli_reference, tmp_path / "run")
    assert_same_metrics(cli_reference, tmp_path / "run")
