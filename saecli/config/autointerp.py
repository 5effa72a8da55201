"""[autointerp]: LLM explanations of features and their detection/fuzzing scores (`saecli autointerp`).

The LLMs are described by [autointerp.explainer] and (optionally, else the explainer's) [autointerp.scorer].
An API key is never written in a config file: `api_key_env` names the environment variable holding it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from saecli.config.base import bad, check_signs, opt

Scorer = Literal["detection", "fuzzing"]


@dataclass
class LLMConfig:
    backend: Literal["openai", "local"] = opt(
        "openai", help="'openai': any OpenAI-compatible chat endpoint; 'local': a transformers chat model in process"
    )
    model: str = opt("", help="model name sent to the endpoint, or the local model folder / hub name")
    base_url: str = opt("http://127.0.0.1:8000/v1", help="OpenAI-compatible endpoint (backend 'openai')")
    api_key_env: str | None = opt(None, help="NAME of the environment variable holding the API key (none: no key)")
    api_key: str | None = opt(None, help="never set this: keys do not belong in config files (use api_key_env)")
    gguf_file: str | None = opt(None, help="GGUF file inside `model` (backend 'local')")
    dtype: Literal["float32", "float16", "bfloat16"] = opt("float32", help="dtype of a local model")
    device: str = opt("auto", help="device of a local model")
    batch_size: int = opt(8, help="requests generated together by a local model")
    max_tokens: int = opt(200, help="longest answer, in tokens")
    temperature: float = opt(0.0, help="sampling temperature (0: greedy)")
    timeout_s: float = opt(60.0, help="give up one request after this many seconds (then retry)")
    max_retries: int = opt(5, help="retries of a request on 429, 5xx, timeouts and connection errors")
    retry_initial_s: float = opt(0.5, help="first backoff wait; each retry doubles it (with full jitter)")
    retry_max_s: float = opt(30.0, help="longest backoff wait")
    price_input_per_mtok: float = opt(0.0, help="price of a million prompt tokens (for the cost counter)")
    price_output_per_mtok: float = opt(0.0, help="price of a million answer tokens (for the cost counter)")

    def validate(self) -> None:
        if self.api_key is not None:
            raise bad(
                "api_key",
                "an API key must not be written in a config file (it would be copied into run "
                "folders and logs); put it in an environment variable and name that variable with "
                'api_key_env = "OPENAI_API_KEY"',
            )
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise bad(
                "api_key_env",
                "must be the NAME of an environment variable (letters, digits, _), not a key: "
                "if you pasted a key here, revoke it and export it instead",
            )
        check_signs(
            self,
            positive=("batch_size", "max_tokens", "timeout_s", "retry_initial_s", "retry_max_s"),
            non_negative=("max_retries", "temperature", "price_input_per_mtok", "price_output_per_mtok"),
        )


@dataclass
class AutointerpConfig:
    name: str = opt("default", help="results folder name under <analysis>/autointerp/ (re-runs resume it)")
    features: list[int] | None = opt(None, help="explain exactly these features")
    feature_range: tuple[int, int] | None = opt(None, help="explain features [start, stop)")
    sample: int | None = opt(None, help="explain a random sample of this many of the selected features")
    seed: int = opt(0, help="seed of the sample and of the scorers' shuffles and random marks")
    min_density: float = opt(0.0, help="only features firing on more than this fraction of tokens (0: alive only)")
    max_density: float = opt(1.0, help="only features firing on at most this fraction of tokens")
    explain_top: int = opt(10, help="top contexts shown to the explainer (the rest are held out for scoring)")
    explain_per_tier: int = opt(2, help="contexts of each lower tier also shown to the explainer")
    window_before: int = opt(16, help="tokens shown before a context's peak")
    window_after: int = opt(4, help="tokens shown after a context's peak")
    threshold: float = opt(0.3, help="a token is marked when its activation is >= this fraction of its context's max")
    dla_tokens: int = opt(8, help="DLA top tokens shown to the explainer when `saecli dla` ran (0: none)")
    scorers: list[Scorer] = opt(["detection", "fuzzing"], help="scorers to run after explaining")
    examples_per_prompt: int = opt(5, help="contexts labelled per scorer request")
    max_answer_retries: int = opt(2, help="asks again this many times when an answer cannot be parsed")
    max_workers: int = opt(4, help="features in flight at once")
    explainer: LLMConfig = opt(factory=LLMConfig, help="the explaining LLM")
    scorer: LLMConfig | None = opt(None, help="the scoring LLM (default: the explainer)")

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise bad("name", f"must be a plain folder name, found {self.name!r}")
        if self.feature_range is not None and not 0 <= self.feature_range[0] < self.feature_range[1]:
            raise bad(
                "feature_range", f"expected [start, stop) with 0 <= start < stop, found {list(self.feature_range)}"
            )
        if self.features is not None and any(i < 0 for i in self.features):
            raise bad("features", "feature indices are >= 0")
        if self.sample is not None and self.sample <= 0:
            raise bad("sample", f"must be > 0, found {self.sample}")
        if not 0 < self.max_density <= 1:
            raise bad("max_density", f"must be in (0, 1], found {self.max_density}")
        if not 0 <= self.min_density < self.max_density:
            raise bad(
                "min_density", f"expected 0 <= min_density < max_density ({self.max_density}), found {self.min_density}"
            )
        check_signs(
            self,
            positive=("explain_top", "examples_per_prompt", "max_workers"),
            non_negative=("explain_per_tier", "window_before", "window_after", "dla_tokens", "max_answer_retries"),
        )
        if not 0 < self.threshold < 1:
            raise bad("threshold", f"must be in (0, 1), found {self.threshold}")

    @property
    def scoring_llm(self) -> LLMConfig:
        return self.scorer or self.explainer
