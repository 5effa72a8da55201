"""`accelerate launch` with two CPU processes (gloo): `train` is data parallel (one writer, each rank its
own documents, gradients averaged) and `sweep` spreads its members over the ranks. Each test asserts the
world size, so a silent single-process run cannot pass, and compares with the single-process result.
Each launch costs ~17 s here (two interpreters importing torch and transformers; ~30 s when the
machine is busy), both together well under a minute, so both stay in the default run;
`pytest -m distributed` selects them.

`--multi_gpu` is what starts two ranks on a CPU-only machine (accelerate 1.15's `--cpu` starts one
plain process); torchrun underneath sets RANK/WORLD_SIZE and saecli starts a gloo process group.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_topk_toml
from safetensors.torch import load_file

from saecli.config.load import load_experiment
from saecli.runs import run_sweep, train
from saecli.runs.sweep import SWEEP_FILE
from saecli.sweep.grid import load_sweep
from saecli.training.checkpoint import list_checkpoints
from saecli.training.logger import read_metrics

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
        reason="accelerate is not installed",
    ),
]


def accelerate(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(exe) if exe.exists() else "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "saecli",
        *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_experiment(path: Path, model: Path, out: Path, extra: str = "") -> Path:
    return tiny_topk_toml(
        path,
        model,
        out,
        name="dp",
        activations="""
        model_batch_size = 4
        batch_size = 256
        shuffle_buffer_tokens = 1024
    """,
        trainer="""
        total_training_tokens = 10240     # 20 steps of 2 × 256 tokens
        lr = 4e-3
        lr_warm_up_steps = 0
        log_frequency = 5
        n_checkpoints = 2
        checkpoint_every_seconds = 0
    """,
        extra="[init]\ninit_batches = 1\n" + textwrap.dedent(extra),
    )


def test_accelerate_train_is_data_parallel(tiny_llama, tmp_path):
    toml = tiny_experiment(tmp_path / "exp.toml", tiny_llama, tmp_path / "dp")
    proc = accelerate("train", toml)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "dp"
    state = torch.load(list_checkpoints(out)[-1][1] / "trainer.pt", weights_only=False)
    assert state["member"]["world_size"] == 2  # really two processes
    assert [s["rank"] for s in state["stream"]] == [0, 1]  # each rank's own stream position
    records = read_metrics(out)
    assert [r["step"] for r in records] == [5, 10, 15, 20]  # one writer: no line twice
    assert records[-1]["tokens"] == 10240  # both ranks' tokens
    assert (proc.stdout + proc.stderr).count("final metrics") == 1  # only rank 0 prints
    # the start header: world size (machines × processes), mesh, per-rank batch — printed once
    assert (proc.stdout + proc.stderr).count(
        "world size 2 (1 machine × 2 processes) · mesh dp=2 · per rank 256 tokens per step"
    ) == 1
    # one process, the same tokens per optimizer step (2 batches accumulated), other documents
    single = train(
        load_experiment(toml, [f'run.output_dir="{tmp_path / "single"}"', "trainer.gradient_accumulation_steps=2"])
    ).folder
    ref = read_metrics(single)
    assert [r["step"] for r in ref] == [5, 10, 15, 20] and ref[-1]["tokens"] == 10240
    assert records[-1]["explained_variance"] == pytest.approx(ref[-1]["explained_variance"], abs=0.1)
    assert records[-1]["loss"] == pytest.approx(ref[-1]["loss"], rel=0.25)
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]  # it learned


def test_accelerate_sweep_spreads_members_over_ranks(tiny_llama, tmp_path):
    toml = tiny_experiment(
        tmp_path / "sweep.toml",
        tiny_llama,
        tmp_path / "dp",
        extra="""
        [sweep]
        grid = {"trainer.lr" = [2e-3, 8e-3], "sae.k" = [4, 8]}
    """,
    )
    proc = accelerate("sweep", toml, "--set", "trainer.total_training_tokens=2560")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((tmp_path / "dp" / SWEEP_FILE).read_text())
    assert info["world_size"] == 2
    assert sorted(m["rank"] for m in info["members"]) == [0, 0, 1, 1]  # one group cut in two halves
    assert (proc.stdout + proc.stderr).count("sweep: 4 members") == 1  # rank 0 reports for all
    assert (proc.stdout + proc.stderr).count("sweep: world size 2 (1 machine × 2 processes) · mesh dp=2") == 1
    plan = load_sweep(toml, ["trainer.total_training_tokens=2560", f'run.output_dir="{tmp_path / "single"}"'])
    rows = run_sweep(plan)  # the same sweep in one process (all four in one group)
    assert [r["status"] for r in rows] == ["finished"] * 4
    for m in plan.members:
        a = load_file(str(m.folder / "sae_weights.safetensors"))
        b = load_file(str(tmp_path / "dp" / m.name / "sae_weights.safetensors"))
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), (m.name, k)
