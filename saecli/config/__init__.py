"""Experiment files: TOML sections parsed into validated dataclasses."""

from saecli.config.experiment import Experiment
from saecli.config.load import load_experiment, write_resolved

__all__ = ["Experiment", "load_experiment", "write_resolved"]
