"""The autointerp loop: pick features, explain each, score the explanation, write each feature as it ends.

Features run `max_workers` at a time on threads (the backends block on I/O or batch on one model). Each
finished feature is written to its own file at once (atomically) and handed to `on_done` (the store),
so a run killed at any moment loses at most the features in flight.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from saecli.analysis.dla import DLAResult
from saecli.analysis.records import AnalysisResult
from saecli.autointerp.backends import ChatBackend, Reply
from saecli.autointerp.prompts import Messages, explainer_prompt, parse_explanation, parse_labels, scorer_prompt
from saecli.autointerp.results import Results
from saecli.autointerp.scorers import FeatureExamples, batches, feature_examples, samples_for, score
from saecli.config.autointerp import AutointerpConfig, LLMConfig
from saecli.errors import ConfigError

RETRY_NOTE = "Your answer could not be read. Answer again with only the requested {what}, nothing else."


def select_features(result: AnalysisResult, cfg: AutointerpConfig) -> list[int]:
    """Features asked for (all, a list or a range), kept when their density is in (min, max], then sampled."""
    n = result.d_sae
    if cfg.features is not None:
        wrong = [i for i in cfg.features if i >= n]
        if wrong:
            raise ConfigError(
                f"features {wrong} do not exist: the dictionary has {n} (0–{n - 1})", key="autointerp.features"
            )
        chosen = sorted(set(cfg.features))
    elif cfg.feature_range is not None:
        start, stop = cfg.feature_range
        if start >= n:
            raise ConfigError(f"starts past the last feature ({n - 1})", key="autointerp.feature_range")
        chosen = list(range(start, min(stop, n)))
    else:
        chosen = list(range(n))
    density = result.density()
    chosen = [i for i in chosen if cfg.min_density < density[i] <= cfg.max_density]
    if cfg.sample is not None and cfg.sample < len(chosen):
        rng = np.random.default_rng(cfg.seed)
        chosen = sorted(int(i) for i in rng.choice(chosen, size=cfg.sample, replace=False))
    return chosen


@dataclass
class Asked:
    value: object | None
    attempts: int
    answer: str
    prompt_tokens: int
    completion_tokens: int


def ask(
    backend: ChatBackend, messages: Messages, parse: Callable[[str], object | None], retries: int, what: str
) -> Asked:
    """Ask, parse; on an unusable answer ask again (showing the model its answer) up to `retries` times."""
    pt = ct = 0
    reply = Reply("", 0, 0)
    convo = list(messages)
    for attempt in range(1, retries + 2):
        reply = backend.chat(convo)
        pt, ct = pt + reply.prompt_tokens, ct + reply.completion_tokens
        value = parse(reply.text)
        if value is not None:
            return Asked(value, attempt, reply.text, pt, ct)
        convo = [
            *messages,
            {"role": "assistant", "content": reply.text},
            {"role": "user", "content": RETRY_NOTE.format(what=what)},
        ]
    return Asked(None, retries + 1, reply.text, pt, ct)


def _cost(cfg: LLMConfig, asked: Sequence[Asked]) -> float:
    return (
        sum(a.prompt_tokens * cfg.price_input_per_mtok + a.completion_tokens * cfg.price_output_per_mtok for a in asked)
        / 1e6
    )


class Interpreter:
    """Explains and scores one feature at a time (thread-safe: no shared mutable state)."""

    def __init__(
        self,
        result: AnalysisResult,
        cfg: AutointerpConfig,
        explainer: ChatBackend,
        scorer: ChatBackend,
        dla: DLAResult | None,
        run: str,
    ):
        self.result, self.cfg, self.explainer, self.scorer, self.dla, self.run = (
            result,
            cfg,
            explainer,
            scorer,
            dla,
            run,
        )
        self.vocab = result.vocab

    def dla_tokens(self, index: int) -> list[str]:
        if self.dla is None or self.cfg.dla_tokens == 0 or index >= self.dla.d_sae:
            return []
        return [self.dla.vocab.get(int(t), str(int(t))) for t in self.dla.pos_ids[index, : self.cfg.dla_tokens]]

    def prompt(self, index: int) -> tuple[Messages, tuple[FeatureExamples, np.random.Generator, dict]]:
        """The explainer's messages for a feature, and the feature's examples (for scoring)."""
        cfg = self.cfg
        rec = self.result.feature(index)
        rng = np.random.default_rng([cfg.seed, index])
        ex = feature_examples(
            rec,
            self.vocab,
            explain_top=cfg.explain_top,
            explain_per_tier=cfg.explain_per_tier,
            window=(cfg.window_before, cfg.window_after),
            rng=rng,
        )
        return explainer_prompt(ex.shown, rec["max_act"], cfg.threshold, self.dla_tokens(index)), (ex, rng, rec)

    def __call__(self, index: int) -> dict:
        cfg = self.cfg
        started = time.time()
        messages, (ex, rng, rec) = self.prompt(index)
        explained = ask(self.explainer, messages, parse_explanation, cfg.max_answer_retries, "JSON object")
        record: dict = {
            "index": index,
            "run": self.run,
            "density": rec["density"],
            "max_act": rec["max_act"],
            "explanation": explained.value,
            "explainer": {
                "model": self.explainer.cfg.model,
                "attempts": explained.attempts,
                "answer": explained.answer[:2000],  # what the model said (to judge the parser)
                **({} if explained.value is not None else {"bad_answer": explained.answer[:2000]}),
            },
            "scores": {},
        }
        spent_e, spent_s = [explained], []
        if explained.value is not None:
            for kind in cfg.scorers:
                samples = samples_for(kind, ex, cfg.threshold, rng)
                predicted: list[bool | None] = []
                bad = 0
                for batch in batches(samples, cfg.examples_per_prompt):
                    msgs = scorer_prompt(kind, str(explained.value), [s.text for s in batch])
                    got = ask(
                        self.scorer,
                        msgs,
                        functools.partial(parse_labels, n=len(batch)),
                        cfg.max_answer_retries,
                        "JSON list",
                    )
                    spent_s.append(got)
                    bad += got.value is None
                    predicted += list(got.value) if got.value is not None else [None] * len(batch)  # type: ignore[call-overload]
                if samples:
                    record["scores"][kind] = {
                        **score(samples, predicted),
                        "bad_answers": bad,
                        "model": self.scorer.cfg.model,
                    }
        spent = spent_e + spent_s
        record["usage"] = {
            "requests": sum(a.attempts for a in spent),
            "prompt_tokens": sum(a.prompt_tokens for a in spent),
            "completion_tokens": sum(a.completion_tokens for a in spent),
            "cost": _cost(self.explainer.cfg, spent_e) + _cost(self.scorer.cfg, spent_s),
        }
        record["seconds"] = round(time.time() - started, 3)
        return record


def run_features(
    interpreter: Interpreter,
    indices: Sequence[int],
    results: Results,
    *,
    max_workers: int,
    on_done: Callable[[dict], None],
) -> int:
    """Run every feature, `max_workers` at once; each is written by its worker as it finishes (the fsyncs
    overlap), then handed to `on_done` on this thread (the store needs no locking).

    The first error that is not a bad answer (the endpoint gone, a refused key) stops the run: features in
    flight finish, the rest are not started, and the error is raised."""
    finished, error = 0, None
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="saecli-autointerp")

    def job(index: int) -> dict:
        record = interpreter(index)
        results.write(record)
        return record

    try:
        pending = {pool.submit(job, i) for i in indices}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut.cancelled():
                    continue
                if fut.exception() is not None:
                    if error is None:  # stop starting features; those in flight still end and are kept
                        error = fut.exception()
                        for other in pending:
                            other.cancel()
                    continue
                on_done(fut.result())
                finished += 1
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if error is not None:
        raise error
    return finished
