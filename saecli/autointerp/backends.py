"""Chat backends: any OpenAI-compatible endpoint, or a transformers chat model run in this process.

Both are called from many worker threads at once (`chat(messages)` blocks until the answer). The
endpoint client retries 429, 408, 409, 5xx, timeouts and connection errors with exponential backoff and
full jitter (tenacity); 401/403/404 (a bad key, an unknown model) stop the run; another 4xx is recorded as
that request's (bad) answer. The local model
gathers the requests waiting at a moment into one padded batch for `generate`.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from saecli.autointerp.prompts import Messages
from saecli.config.autointerp import LLMConfig
from saecli.errors import RunError, UsageError


@dataclass(frozen=True)
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Usage:
    """Running totals over every request of a run (thread-safe), priced per model."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reply: Reply, cfg: LLMConfig) -> None:
        with self._lock:
            self.requests += 1
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens
            self.cost += (
                reply.prompt_tokens * cfg.price_input_per_mtok + reply.completion_tokens * cfg.price_output_per_mtok
            ) / 1e6

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "retries": self.retries,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cost": round(self.cost, 6),
            }


class ChatBackend(Protocol):
    cfg: LLMConfig

    def chat(self, messages: Messages) -> Reply: ...

    def close(self) -> None: ...


def api_key(cfg: LLMConfig) -> str:
    """The key from the environment variable the config names ("none" for keyless local servers)."""
    if cfg.api_key_env is None:
        return "none"
    value = os.environ.get(cfg.api_key_env)
    if not value:
        raise UsageError(
            f"autointerp: the API key variable {cfg.api_key_env} (api_key_env) is not set or empty; "
            f"export {cfg.api_key_env}=... before running"
        )
    return value


class RetryableStatus(Exception):
    """An HTTP answer worth retrying (429, 408, 409, 5xx)."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


class OpenAIChat:
    """POST /chat/completions with httpx (one pooled client shared by the workers; the openai package
    costs ~7 ms of CPU per request here, which 16 workers on a small machine feel)."""

    def __init__(self, cfg: LLMConfig, usage: Usage):
        import httpx

        self.cfg, self.usage = cfg, usage
        self._client = httpx.Client(
            base_url=cfg.base_url.rstrip("/") + "/",
            timeout=cfg.timeout_s,
            headers={"Authorization": f"Bearer {api_key(cfg)}"},
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self._transient = (RetryableStatus, httpx.TransportError)  # connection errors and timeouts included

    def _post(self, messages: Messages) -> dict:
        r = self._client.post(
            "chat/completions",
            json={
                "model": self.cfg.model,
                "messages": messages,
                "max_tokens": self.cfg.max_tokens,
                "temperature": self.cfg.temperature,
            },
        )
        if r.status_code in (408, 409, 429) or r.status_code >= 500:
            raise RetryableStatus(r.status_code)
        if r.status_code in (401, 403, 404):
            raise RunError(
                f"the chat endpoint {self.cfg.base_url} refused model {self.cfg.model!r}: "
                f"HTTP {r.status_code} ({r.text[:200]})"
            )
        if r.status_code >= 400:  # 400/422: this request is bad (too long...), not the run
            return {"choices": [{"message": {"content": f"<request rejected: HTTP {r.status_code}>"}}]}
        try:
            return r.json()
        except ValueError:
            return {"choices": [{"message": {"content": "<the endpoint answered something that is not JSON>"}}]}

    def chat(self, messages: Messages) -> Reply:
        import tenacity

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(self._transient),
            wait=tenacity.wait_random_exponential(multiplier=self.cfg.retry_initial_s, max=self.cfg.retry_max_s),
            stop=tenacity.stop_after_attempt(self.cfg.max_retries + 1),
            before_sleep=lambda _state: self.usage.retried(),
            reraise=True,
        )
        try:
            body = retrying(self._post, messages)
        except self._transient as exc:
            raise RunError(
                f"the chat endpoint {self.cfg.base_url} failed {self.cfg.max_retries + 1} times in a row "
                f"({type(exc).__name__}: {exc}); finished features are saved, run again to resume"
            ) from None
        choices = body.get("choices") or [{}]
        text = (choices[0].get("message") or {}).get("content") or ""
        usage = body.get("usage") or {}
        reply = Reply(str(text), int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        self.usage.add(reply, self.cfg)
        return reply

    def close(self) -> None:
        self._client.close()


PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}assistant:"


class LocalChat:
    """A transformers causal LM answering chat requests in batches (one generate per batch)."""

    def __init__(self, cfg: LLMConfig, usage: Usage):
        import torch

        from saecli.config.model import ModelConfig
        from saecli.dtypes import DTYPES
        from saecli.lm.loading import _load_pretrained, _source, resolve_device

        self.cfg, self.usage = cfg, usage
        mcfg = ModelConfig(name=cfg.model, gguf_file=cfg.gguf_file, dtype=cfg.dtype, device=cfg.device)
        source, gguf = _source(mcfg)
        model, tokenizer = _load_pretrained(mcfg, source, gguf, DTYPES[cfg.dtype])
        self.device = resolve_device(cfg.device)
        self.model = model.to(device=self.device, dtype=DTYPES[cfg.dtype]).eval()
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._template = None if getattr(tokenizer, "chat_template", None) else PLAIN_TEMPLATE
        self._torch = torch
        self._queue: queue.Queue[tuple[Messages, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="saecli-local-chat", daemon=True)
        self._thread.start()

    def chat(self, messages: Messages) -> Reply:
        done: Future = Future()
        self._queue.put((messages, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            time.sleep(0.002)  # let the other workers' requests of this moment arrive
            while len(batch) < self.cfg.batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                replies = self.generate([m for m, _ in batch])
            except BaseException as exc:  # the waiting workers re-raise it
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            for (_, fut), reply in zip(batch, replies):
                self.usage.add(reply, self.cfg)
                fut.set_result(reply)

    def generate(self, conversations: list[Messages]) -> list[Reply]:
        tok, torch = self.tokenizer, self._torch
        texts = [
            tok.apply_chat_template(m, chat_template=self._template, tokenize=False, add_generation_prompt=True)
            for m in conversations
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = self.cfg.temperature > 0
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=self.cfg.max_tokens,
                do_sample=sample,
                temperature=self.cfg.temperature if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        stop = self.model.generation_config.eos_token_id
        stop = torch.tensor(
            [
                *(stop if isinstance(stop, list) else [stop] if stop is not None else []),
                tok.eos_token_id,
                tok.pad_token_id,
            ],
            device=new.device,
        )
        replies = []
        for row, mask in zip(new, enc["attention_mask"]):
            ends = torch.isin(row, stop).nonzero()
            n = int(ends[0]) if len(ends) else len(row)
            replies.append(Reply(tok.decode(row[:n], skip_special_tokens=True), int(mask.sum()), n))
        return replies

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)


def open_backend(cfg: LLMConfig, usage: Usage) -> ChatBackend:
    return OpenAIChat(cfg, usage) if cfg.backend == "openai" else LocalChat(cfg, usage)
