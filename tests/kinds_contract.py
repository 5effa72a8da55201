"""Checks every dictionary kind must pass, written once and called from each kind's test file."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saecli.config.base import parse
from saecli.config.experiment import Experiment
from saecli.data.stream import ActivationStream
from saecli.training import NullReporter, train


class CtrlCAt(NullReporter):
    """Sends this process a SIGINT when `step` is logged, as a user pressing Ctrl-C would."""

    def __init__(self, step: int):
        self.step = step

    def log(self, member, record):
        if record["step"] == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def assert_same_weights(a: Path, b: Path) -> dict[str, torch.Tensor]:
    """The saved weights of two run folders agree to 1e-6; returns the first folder's."""
    wa = load_file(str(a / "sae_weights.safetensors"))
    wb = load_file(str(b / "sae_weights.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], rtol=0, atol=1e-6), (key, (wa[key] - wb[key]).abs().max())
    return wa


def assert_resume_after_ctrl_c_is_exact(tmp_path: Path, sae: dict, trainer: dict,
                                        stream: Callable[[], ActivationStream], *, at: int, saved: str) -> None:
    """Trains `sae` once straight through and once stopped by Ctrl-C at step `at` then resumed: the
    weights must agree, and the kind-specific tensor `saved` (a threshold, the skip…) must be among them."""

    def experiment(folder: Path) -> Experiment:
        return parse(Experiment, {
            "run": {"output_dir": str(folder), "name": "x"},
            "sae": sae,
            "trainer": {"lr": 5e-3, "n_checkpoints": 2, "checkpoint_every_seconds": 0, **trainer},
            "store": {"backend": "none"}})

    ref = train(experiment(tmp_path / "ref"), stream=stream())
    cut = experiment(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        train(cut, stream=stream(), reporter=CtrlCAt(at))
    train(cut, stream=stream(), resume=True)
    assert saved in assert_same_weights(ref, tmp_path / "cut")
