"""Two "machines" on localhost: experiments/multinode/accelerate.yaml (with this host's address, a free
port and 2 processes in all) launched twice, machine_rank 0 and 1, as the README shows for real nodes.
The rendezvous joins them; the run prints its world size (machines × processes), mesh and per-rank batch."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_topk_toml

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        shutil.which("accelerate") is None and not ACCELERATE.exists(), reason="accelerate is not installed"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_machine_launch_from_the_example_config(tiny_llama, tmp_path):
    cfg = yaml.safe_load((REPO / "experiments" / "multinode" / "accelerate.yaml").read_text())
    assert cfg["num_machines"] == 2 and cfg["rdzv_backend"] == "static"
    cfg.update(main_process_ip="127.0.0.1", main_process_port=free_port(), num_processes=2)
    config = tmp_path / "accelerate.yaml"
    config.write_text(yaml.safe_dump(cfg))
    toml = tiny_topk_toml(
        tmp_path / "exp.toml",
        tiny_llama,
        tmp_path / "run",
        name="mn",
        activations="""
        model_batch_size = 4
        batch_size = 128
        shuffle_buffer_tokens = 512
    """,
        trainer="""
        total_training_tokens = 2560
        n_checkpoints = 0
    """,
    )
    exe = str(ACCELERATE) if ACCELERATE.exists() else "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    def launch(rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            [
                exe,
                "launch",
                "--config_file",
                str(config),
                "--machine_rank",
                str(rank),
                "-m",
                "saecli",
                "train",
                str(toml),
            ],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    procs = [launch(1), launch(0)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][-3000:] + outs[0][-3000:]
    main = outs[1]
    assert "world size 2 (2 machines × 1 process) · mesh dp=2 · per rank 128 tokens per step" in main
    assert "world size" not in outs[0]  # machine 1 prints nothing of its own
    assert (tmp_path / "run" / "summary.json").exists()
