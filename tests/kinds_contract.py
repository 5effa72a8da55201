"""Checks every dictionary kind must pass, written once and called from each kind's test file."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from saecli.config.base import parse
from saecli.config.experiment import Experiment
from saecli.data.stream import ActivationStream
from saecli.dictionaries.base import LossOutput, StepContext
from saecli.runs import train
from saecli.training import NullReporter


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


def assert_resume_after_ctrl_c_is_exact(
    tmp_path: Path, sae: dict, trainer: dict, stream: Callable[[], ActivationStream], *, at: int, saved: str
) -> None:
    """Trains `sae` once straight through and once stopped by Ctrl-C at step `at` then resumed: the
    weights must agree, and the kind-specific tensor `saved` (a threshold, the skip…) must be among them."""

    def experiment(folder: Path) -> Experiment:
        return parse(
            Experiment,
            {
                "run": {"output_dir": str(folder), "name": "x"},
                "sae": sae,
                "trainer": {"lr": 5e-3, "n_checkpoints": 2, "checkpoint_every_seconds": 0, **trainer},
                "store": {"backend": "none"},
            },
        )

    ref = train(experiment(tmp_path / "ref"), stream=stream()).folder
    cut = experiment(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        train(cut, stream=stream(), reporter=CtrlCAt(at))
    train(cut, stream=stream(), resume=True)
    assert saved in assert_same_weights(ref, tmp_path / "cut")


def assert_fold_keeps_raw_outputs(
    m: Any, in_hook: str, out_hook: str, raw: torch.Tensor, folder: Path, *, latent_atol: float = 1e-5
) -> None:
    """Folding the dataset-wise scale into the weights keeps outputs and latents on raw inputs, some but
    not all latents fire, and the folded dictionary saves and loads as such."""
    from saecli.dictionaries.registry import load_dictionary

    before = m.reconstruct({in_hook: raw})[out_hook]
    f_before = m.encode(m.normalize({in_hook: raw}))
    assert 0 < int((f_before != 0).sum()) < f_before.numel()
    m.fold_activation_scale()
    assert m.folded
    assert torch.allclose(m.reconstruct({in_hook: raw})[out_hook], before, rtol=1e-4, atol=1e-5)
    assert torch.allclose(m.encode(m.normalize({in_hook: raw})), f_before, rtol=1e-4, atol=latent_atol)
    m.save(folder)
    back = load_dictionary(folder)
    assert back.folded
    assert torch.allclose(back.reconstruct({in_hook: raw})[out_hook], before, rtol=1e-4, atol=1e-5)


def train_with_auxk(
    student: Any, sample: Callable[[int], dict[str, torch.Tensor]], steps: int, k: int
) -> tuple[float, float, LossOutput]:
    """Plain Adam on `sample(256)` batches with AuxK on latents that did not fire lately (after step 50),
    from `init_from_data` on 2048 samples: (first step's mse, eval mse on 4096 samples, that eval's output)."""
    student.init_from_data([sample(2048)], None)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    fires = torch.zeros(student.d_sae)
    first = None
    for step in range(steps):
        dead = fires < 1 if step > 50 else None
        out = student(sample(256), StepContext(k=k, training=True, auxk_coefficient=1 / 32, k_aux=16, dead_mask=dead))
        acts = out.feature_acts.to_dense() if out.feature_acts.layout != torch.strided else out.feature_acts
        fires = fires * 0.9 + (acts > 0).float().sum(0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = float(out.terms["mse"]) if first is None else first
    with torch.no_grad():
        final = student(sample(4096), StepContext(k=k, training=False))
    return first, float(final.terms["mse"]), final
