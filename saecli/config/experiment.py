"""The whole experiment file: one dataclass per TOML section."""

from __future__ import annotations

from dataclasses import dataclass

from saecli.config.activations import ActivationsConfig
from saecli.config.analyze import AnalyzeConfig, DashboardConfig
from saecli.config.autointerp import AutointerpConfig
from saecli.config.base import aliases, opt
from saecli.config.dataset import DatasetConfig
from saecli.config.dictionary import DictionaryConfig
from saecli.config.evaluation import EvalConfig
from saecli.config.init import InitConfig
from saecli.config.model import ModelConfig
from saecli.config.run import RunConfig, StoreConfig, WandbConfig
from saecli.config.sweep import SweepConfig
from saecli.config.trainer import TrainerConfig
from saecli.errors import ConfigError


@dataclass
class Experiment:
    run: RunConfig = opt(factory=RunConfig)
    model: ModelConfig | None = opt(None, help="the language model (needed for live activations and generate)")
    models: dict[str, ModelConfig] | None = opt(
        None,
        help="model diffing: [models.<label>] tables (instead of [model]), each with [model]'s keys; the "
        "first model's tokenizer packs the text for all; heads are named '<label>/<hook point>'",
        stream=True,
    )
    dataset: DatasetConfig = opt(factory=DatasetConfig)
    activations: ActivationsConfig | None = opt(None)
    dictionary: DictionaryConfig | None = opt(
        None, help="the dictionary to train; `kind` picks which", aliases=("sae",)
    )
    init: InitConfig = opt(factory=InitConfig)
    trainer: TrainerConfig = opt(factory=TrainerConfig)
    eval: EvalConfig = opt(factory=EvalConfig)
    wandb: WandbConfig = opt(factory=WandbConfig)
    store: StoreConfig = opt(factory=StoreConfig)
    analyze: AnalyzeConfig = opt(factory=AnalyzeConfig)
    dashboard: DashboardConfig = opt(factory=DashboardConfig)
    sweep: SweepConfig | None = opt(None, help="many members from this file (saecli sweep)")
    autointerp: AutointerpConfig = opt(factory=AutointerpConfig, help="LLM explanations and scores (saecli autointerp)")

    source_file: str | None = None  # where it was read from (not a TOML key)

    def require(self, *sections: str) -> None:
        """Raise a ConfigError naming the first missing section a command needs."""
        for name in sections:
            name = aliases(Experiment).get(name, name)
            if getattr(self, name) is None:
                raise ConfigError(f"this command needs a [{name}] section", file=self.source_file)
