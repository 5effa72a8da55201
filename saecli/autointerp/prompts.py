"""Chat prompts for explaining a feature and for scoring an explanation, and the parsers of the answers.

Follows delphi's conventions (EleutherAI, "Automatically Interpreting Millions of Features in LLMs"):
activating tokens are marked `<<like this>>` (a run of consecutive marked tokens shares one pair of
marks), a token is marked when its activation is at least `threshold` × its context's max, and the
explainer also sees each marked token's strength on a 0–10 scale of the feature's max. Answers are
requested as JSON; models that ignore that still get parsed by a plain-text fallback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Messages = list[dict[str, str]]
L, R = "<<", ">>"
MAX_STRENGTHS = 10  # marked tokens listed per example, as delphi

EXPLAIN_SYSTEM = """You study one feature of a language model's internal activations. You are shown text excerpts on \
which the feature fires. Tokens where it fires are marked <<like this>> (consecutive marked tokens share one pair of \
marks). After each excerpt, its marked tokens are listed with their strength from 1 to 10 (10: the feature's \
strongest activation).

Find what the marked tokens have in common, taking their context into account, and describe it in one short \
phrase or sentence. Do not mention the << >> marks. Do not list alternatives.

Answer with a JSON object and nothing else: {"explanation": "<your explanation>"}"""

DETECTION_SYSTEM = """You are given the explanation of a feature of a language model and numbered text excerpts. \
For each excerpt, decide whether the feature, as explained, fires on some token of it: 1 if it does, 0 if not.

Answer with a JSON list of 0s and 1s, one per excerpt in order (for example [1, 0, 0, 1, 0]), and nothing else."""

FUZZING_SYSTEM = """You are given the explanation of a feature of a language model and numbered text excerpts. In \
each excerpt some tokens are marked <<like this>>. For each excerpt, decide whether every marked token is one on \
which the feature, as explained, fires: 1 if all marks are right, 0 if they are not.

Answer with a JSON list of 0s and 1s, one per excerpt in order (for example [1, 0, 0, 1, 0]), and nothing else."""


@dataclass(frozen=True)
class Example:
    """A window of one context: token texts, their activations, the sampling it came from."""

    tokens: tuple[str, ...]
    acts: np.ndarray
    tier: str
    activating: bool


def show_token(text: str) -> str:
    """One line per excerpt: newlines and tabs written as escapes."""
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def above(acts: np.ndarray, threshold: float) -> np.ndarray:
    """The tokens a scorer or the explainer sees marked: activation >= threshold × the context's max (and > 0)."""
    a = np.asarray(acts, dtype=np.float32)
    peak = float(a.max()) if a.size else 0.0
    return (a > 0) & (a >= threshold * peak) if peak > 0 else np.zeros(a.shape, dtype=bool)


def highlight(tokens: Sequence[str], marked: Callable[[int], bool] | np.ndarray) -> str:
    """Join tokens, wrapping each run of marked tokens in one `<<` `>>` pair."""
    check = marked if callable(marked) else (lambda i: bool(marked[i]))
    out, inside = [], False
    for i, tok in enumerate(tokens):
        m = check(i)
        if m and not inside:
            out.append(L)
        elif not m and inside:
            out.append(R)
        inside = m
        out.append(show_token(tok))
    if inside:
        out.append(R)
    return "".join(out)


def plain(tokens: Sequence[str]) -> str:
    return "".join(show_token(t) for t in tokens)


def strengths(example: Example, feature_max: float, threshold: float) -> str:
    """`"tok" 10, "tok2" 4` for the first marked tokens, strength = round(10 × act / feature max), at least 1."""
    marks = np.nonzero(above(example.acts, threshold))[0][:MAX_STRENGTHS]
    scale = 10.0 / feature_max if feature_max > 0 else 0.0
    return ", ".join(
        f"{json.dumps(show_token(example.tokens[i]), ensure_ascii=False)} "
        f"{max(1, min(10, round(float(example.acts[i]) * scale)))}"
        for i in marks
    )


def explainer_prompt(
    examples: Sequence[Example], feature_max: float, threshold: float, dla_tokens: Sequence[str] = ()
) -> Messages:
    lines = ["Excerpts, strongest first:", ""]
    for n, ex in enumerate(examples, 1):
        lines.append(f"Example {n}: {highlight(ex.tokens, above(ex.acts, threshold))}")
        lines.append(f"Strength: {strengths(ex, feature_max, threshold)}")
        lines.append("")
    if dla_tokens:
        shown = ", ".join(json.dumps(show_token(t), ensure_ascii=False) for t in dla_tokens)
        lines.append(f"When it fires, the feature makes these next tokens more likely: {shown}")
        lines.append("")
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": "\n".join(lines).rstrip()}]


def scorer_prompt(kind: str, explanation: str, texts: Sequence[str]) -> Messages:
    system = DETECTION_SYSTEM if kind == "detection" else FUZZING_SYSTEM
    body = "\n".join(f"Example {n}: {t}" for n, t in enumerate(texts, 1))
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Feature explanation: {explanation}\n\nExcerpts:\n{body}"},
    ]


# ---------------------------------------------------------------- answers
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
_TAGGED = re.compile(r"(?:\[EXPLANATION\]|explanation)\s*[:=]\s*(.+)", re.I)
_LIST = re.compile(r"\[[^\[\]]*\]")
_LABEL = re.compile(r"(?<![\w.])(0|1|true|false|yes|no)(?![\w.])", re.I)
MAX_EXPLANATION_CHARS = 400


def _clean(text: str, quotes: bool = True) -> str | None:
    text = text.strip()
    if quotes and len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":  # a quoted answer
        text = text[1:-1].strip()
    return text if 0 < len(text) <= MAX_EXPLANATION_CHARS else None


def _objects(text: str):
    """Every JSON object embedded in a text (json's own decoder finds where each one ends)."""
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(text) if c == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        yield value


def parse_explanation(answer: str) -> str | None:
    """The explanation in an answer: the JSON object's "explanation", else a line tagged `Explanation:`,
    else the answer's last non-empty line; None when there is nothing usable (empty, or too long)."""
    text = answer.strip()
    for fenced in _FENCE.findall(text):
        text = fenced.strip() or text
    for value in _objects(text):
        if isinstance(value, dict) and isinstance(value.get("explanation"), str):
            return _clean(value["explanation"], quotes=False)
    tagged = _TAGGED.search(text)
    if tagged:
        return _clean(tagged.group(1).splitlines()[0])
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return _clean(lines[-1]) if lines else None


def _label(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false", "yes", "no"):
        return value.strip().lower() in ("1", "true", "yes")
    return None


def parse_labels(answer: str, n: int) -> list[bool] | None:
    """n yes/no labels: the first JSON list of n 0/1 values, else exactly n 0/1/yes/no words; else None."""
    for blob in _LIST.findall(answer):
        try:
            values = json.loads(blob)
        except json.JSONDecodeError:
            continue
        labels = [_label(v) for v in values] if isinstance(values, list) else []
        if len(labels) == n and all(v is not None for v in labels):
            return labels  # type: ignore[return-value]
    words = [_label(w) for w in _LABEL.findall(answer)]
    if len(words) == n:
        return words  # type: ignore[return-value]
    return None
